"""Mask definitions and per-subject masks, checked against the atlas files read directly."""

import json

import nibabel as nib
import numpy as np
import pytest

from havir.masks import build_masks, definition_for, definitions_dir, load_definition, save_masks
from havir.nsd.layout import NSDLayout


def atlas(root, subject, name):
    return np.asanyarray(nib.load(NSDLayout(root).roi_file(subject, name)).dataobj)


def test_every_shipped_definition_is_valid():
    names = sorted(p.name for p in definitions_dir().glob("*.toml"))
    assert names == ["default.toml"] + [f"subj{s:02d}.toml" for s in range(1, 9)]
    for subject in range(1, 9):
        definition = definition_for(subject)
        assert definition.subject == subject
        assert definition.within.atlas == "nsdgeneral"
        assert {s.atlas for s in definition.structural} == {"prf-visualrois"}


@pytest.mark.parametrize("subject", [1, 4])
def test_masks_come_from_the_atlases_their_definition_names(two_subject_nsd, subject):
    root, _ = two_subject_nsd
    masks = build_masks(NSDLayout(root), subject, definition_for(subject))
    within = atlas(root, subject, "nsdgeneral") == 1
    structural = np.isin(atlas(root, subject, "prf-visualrois"), [1, 2, 3, 4, 5, 6]) & within
    semantic = np.isin(atlas(root, subject, "streams"), [5, 6, 7])
    for floc in ("floc-faces", "floc-bodies", "floc-places", "floc-words"):
        semantic |= atlas(root, subject, floc) > 0
    semantic &= within & ~structural  # the default rule: overlap goes to structural
    np.testing.assert_array_equal(masks.structural, structural)
    np.testing.assert_array_equal(masks.semantic, semantic)
    assert masks.overlap_resolved > 0, "the synthetic atlases must exercise the overlap rule"
    assert not (masks.structural & masks.semantic).any()
    assert masks.summary()["overlap_voxels"] == 0


def test_structural_mask_ignores_the_face_atlas(small_nsd):
    """The public bug: V1-V4 taken from floc-faces. Filling floc-faces must not move V1-V3."""
    root, _ = small_nsd
    layout = NSDLayout(root)
    before = build_masks(layout, 1, definition_for(1))
    faces = nib.load(layout.roi_file(1, "floc-faces"))
    nib.save(nib.Nifti1Image(np.ones(faces.shape, np.int16), faces.affine), layout.roi_file(1, "floc-faces"))
    after = build_masks(layout, 1, definition_for(1))
    np.testing.assert_array_equal(before.structural, after.structural)
    assert after.semantic.sum() > before.semantic.sum()


def test_overlap_rule_semantic_moves_shared_voxels(two_subject_nsd, tmp_path):
    root, _ = two_subject_nsd
    path = tmp_path / "semantic_first.toml"
    path.write_text(f'extends = "{definitions_dir() / "default.toml"}"\noverlap = "semantic"\n')
    default = build_masks(NSDLayout(root), 1, definition_for(1))
    flipped = build_masks(NSDLayout(root), 1, load_definition(path))
    moved = default.structural & ~flipped.structural
    assert moved.sum() == default.overlap_resolved > 0
    assert flipped.semantic[moved].all()
    assert not (flipped.structural & flipped.semantic).any()


def test_saved_masks_round_trip(two_subject_nsd, tmp_path):
    root, _ = two_subject_nsd
    masks = build_masks(NSDLayout(root), 1, definition_for(1))
    paths = save_masks(masks, tmp_path)
    reloaded = nib.load(paths["structural"])
    np.testing.assert_array_equal(np.asanyarray(reloaded.dataobj).astype(bool), masks.structural)
    np.testing.assert_allclose(reloaded.affine, masks.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


@pytest.mark.parametrize(
    "text, message",
    [
        ('[within]\natlas = "nsdgeneral"\nlabels = ["nsdgeneral"]\n[[structural]]\natlas = "prf-visual"\nlabels = ["V1v"]\n'
         '[[semantic]]\natlas = "streams"\nlabels = ["ventral"]\n', "unknown atlas 'prf-visual'"),
        ('extends = "DEFAULT"\ncolour = "red"\n', "unknown keys colour"),
        ('extends = "DEFAULT"\n[[structural]]\natlas = "prf-visualrois"\nlabels = []\n', "non-empty list"),
        ('extends = "DEFAULT"\noverlap = "both"\n', "overlap must be one of"),
        ('extends = "DEFAULT"\nsubject = 9\n', "one of 1..8"),
        ("[within\n", "not valid TOML"),
    ],
)
def test_invalid_definitions_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("DEFAULT", str(definitions_dir() / "default.toml")))
    with pytest.raises(ValueError, match=message):
        load_definition(path)


def test_unknown_label_is_named_with_the_atlas_labels(two_subject_nsd, tmp_path):
    root, _ = two_subject_nsd
    path = tmp_path / "typo.toml"
    path.write_text(f'extends = "{definitions_dir() / "default.toml"}"\n[[structural]]\natlas = "prf-visualrois"\nlabels = ["V1"]\n')
    with pytest.raises(ValueError, match="has no label 'V1'; its labels are V1v, V1d"):
        build_masks(NSDLayout(root), 1, load_definition(path))


def test_definition_for_another_subject_is_refused():
    with pytest.raises(ValueError, match="written for subject 2, not subject 1"):
        definition_for(1, definitions_dir() / "subj02.toml")


def test_each_voxel_of_a_set_is_labelled_with_its_roi(two_subject_nsd):
    """The per-ROI volume the masks figure colours, against the atlas files read directly: a
    structural voxel has its prf-visualrois ROI; a semantic voxel its floc ROI where it has one
    (listed after the streams, drawn over them), else its stream."""
    root, _ = two_subject_nsd
    masks = build_masks(NSDLayout(root), 1, definition_for(1))
    names = list(masks.roi_names)
    assert names[:7] == [f"structural: prf-visualrois/{v}" for v in ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d")] + [
        "semantic: streams/ventral"]
    np.testing.assert_array_equal(masks.roi_labels > 0, masks.structural | masks.semantic)
    prf = atlas(root, 1, "prf-visualrois")
    np.testing.assert_array_equal(masks.roi_labels[masks.structural], prf[masks.structural])  # V1v..V3d are 1..6
    in_floc = np.zeros_like(masks.semantic)
    for floc in ("floc-faces", "floc-bodies", "floc-places", "floc-words"):
        in_floc |= atlas(root, 1, floc) > 0
    floc_voxels, stream_voxels = masks.semantic & in_floc, masks.semantic & ~in_floc
    assert floc_voxels.any() and stream_voxels.any()
    assert all(names[k - 1].startswith("semantic: floc-") for k in np.unique(masks.roi_labels[floc_voxels]))
    streams = atlas(root, 1, "streams")  # ventral, lateral, parietal are 5, 6, 7: names 7..9
    np.testing.assert_array_equal(masks.roi_labels[stream_voxels], streams[stream_voxels] + 2)


def test_a_recorded_definition_reads_back_as_itself():
    definition = definition_for(3)
    assert type(definition).from_dict(json.loads(json.dumps(definition.to_dict()))) == definition
