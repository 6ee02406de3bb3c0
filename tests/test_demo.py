"""`havir demo` end to end: the method's ablation pattern and its null control, on held-out images.

One run of the demo on 600 synthetic images (60 held out; seed 0; the trained demo Versatile
Diffusion), then issue 20's acceptance, as far as it is met today:

* structural mode decodes the simulated early visual cortex (PixCorr, SSIM and stand-in
  identification floors, set from measured values with a margin);
* semantic mode, from noise and the decoded CLIP embeddings alone, gets the background (content
  accuracy >= 70%, chance 25%) and beats the null brain's miniature-CLIP identification;
* fused mode keeps the layout and the content: PixCorr at least the semantic's + 0.1, background
  >= 90%;
* the null brain (the same pipeline trained on shuffled voxel-image pairs, three runs on their own
  shuffles and seeds, averaged per image) stays at chance in every mode: background 25% +- 12
  points, identification within 0.5 +- 0.06.

The page and ``demo.json`` carry every demo measure's bootstrap interval over test images and
the paired difference fused - structural (object-kind F1, mini-CLIP identification) with its
interval, said in words on the page.

Not met yet, so strict xfails (they fail the suite the day they pass, so this file gets updated):
semantic miniature-CLIP identification >= 0.75; fused object-kind F1 and miniature-CLIP
identification above the structural mode's (the whole paired interval above 0). docs/miniature-vd.md
has the figures with their intervals and, under "Where the objects are lost", the measured reasons:
the miniature UNet does not draw object kinds even from the true embeddings, the demo VAE caps the
probe's object F1 of any decoded picture at 0.65, and mini-CLIP identification reads background
and colours, which the simulated semantic voxels do not carry (a perfect semantic reconstruction
scores about 0.80).

Why three null runs: with reconstructions independent of their stimuli, each image's
identification is the rank of its own correlation among n, uniform on {0, ..., n-1}/(n-1), so the
mean's standard error is sqrt((n + 1) / (12 n (n - 1))): 0.038 at n = 60, and one shuffled decoder
adds its own draw. Over nine shuffles of this demo (one run each), each of the six null
identifications spread with SD 0.030-0.043 about a mean of 0.485-0.511, and all six fell within
+- 0.06 for four of the nine (the first run, seed 0, had 0.437); background accuracy is the share
of the one or two backgrounds a null run paints (SD 0.07-0.08). The mean of three runs divides
those spreads by sqrt(3) (six within +- 0.06 with probability about 0.97, by a normal model of the
nine), for about 250 s more demo here.
"""

import json

import pytest

STRUCTURAL_FLOORS = {"pixcorr": 0.55, "ssim": 0.60, "lite0_identification": 0.65}
TEST_IMAGES = 60


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    from havir.cli import main

    out = tmp_path_factory.mktemp("demo")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--images", str(10 * TEST_IMAGES), "--json"])
    assert exit_info.value.code == 0
    return out


@pytest.fixture(scope="module")
def summary(demo_result):
    return json.loads((demo_result / "demo.json").read_text())


def _measure(summary, run, mode, name):
    return summary["demo_measures"][run][mode][name]["mean"]


def test_structural_mode_decodes_early_visual_cortex(summary):
    assert summary["test_images"] == TEST_IMAGES
    structural = summary["modes"]["structural"]
    for name, floor in STRUCTURAL_FLOORS.items():
        assert structural[name] >= floor, f"structural {name} {structural[name]:.3f} below its floor {floor}"


def test_semantic_mode_recovers_the_content(summary):
    assert _measure(summary, "method", "semantic", "content_accuracy") >= 0.70
    identification = _measure(summary, "method", "semantic", "mini_clip_identification")
    assert identification >= _measure(summary, "null", "semantic", "mini_clip_identification") + 0.08


def test_fusion_keeps_the_layout_and_the_content(summary):
    modes = summary["modes"]
    assert modes["fused"]["pixcorr"] >= modes["semantic"]["pixcorr"] + 0.1
    assert _measure(summary, "method", "fused", "content_accuracy") >= 0.90


@pytest.mark.xfail(strict=True, reason="issue 20, not met: semantic mini-CLIP identification 0.596 (docs/miniature-vd.md)")
def test_semantic_mode_reaches_the_mini_clip_goal(summary):
    assert _measure(summary, "method", "semantic", "mini_clip_identification") >= 0.75


@pytest.mark.xfail(strict=True, reason="issue 20, not met: fusion adds no object content to the structural mode (docs/miniature-vd.md)")
@pytest.mark.parametrize("name", ["object_kind_f1", "mini_clip_identification"])
def test_fusion_adds_content_to_the_structural_mode(summary, name):
    assert summary["fusion_vs_structural"]["method"][name]["higher"], summary["fusion_vs_structural"]["method"][name]


@pytest.mark.parametrize("mode", ["structural", "fused", "semantic"])
def test_null_brain_stays_at_chance(summary, mode):
    identifications = {name: value for name, value in summary["null_modes"][mode].items() if name.endswith("identification")}
    identifications["mini_clip_identification"] = _measure(summary, "null", mode, "mini_clip_identification")
    for name, value in identifications.items():
        assert abs(value - 0.5) <= 0.06, f"null {mode} {name} {value:.3f}"
    assert abs(_measure(summary, "null", mode, "content_accuracy") - 0.25) <= 0.12


def test_demo_pages_and_outputs(demo_result, summary):
    page = (demo_result / "demo.html").read_text()
    assert summary["report"] == str(demo_result / "demo.html")
    assert "proves nothing unless it beats the null" in page and "DEMO MEASURES" in page
    assert page.count('<tr class="null">') == 3 and page.count('<tr class="method">') == 3
    for run in ("method", "null brain (shuffled pairs)"):  # fused - structural in words, with its paired interval
        assert page.count(f"{run}: fusion adds object content (object-kind F1): ") == 1
        assert page.count(f"{run}: fusion adds identifiable content (mini-CLIP identification): ") == 1
    for run in ("method", "null"):
        for name, gain in summary["fusion_vs_structural"][run].items():
            low, high = gain["interval"]
            assert low <= gain["difference"] <= high and gain["higher"] == (low > 0), (run, name, gain)
            fused, structural = (_measure(summary, run, mode, name) for mode in ("fused", "structural"))
            assert gain["difference"] == pytest.approx(fused - structural, abs=2e-4)
        for by_name in summary["demo_measures"][run].values():
            assert all(value["interval"][0] <= value["mean"] <= value["interval"][1] for value in by_name.values())
    assert summary["demo_measure_bootstrap"]["resampled"] == "test images"
    assert 'href="recon/fused/eval/report.html"' in page and 'href="recon-null/fused/eval/report.html"' in page
    report = (demo_result / "recon" / "fused" / "eval" / "report.html").read_text()
    assert "miniature" in report and "STAND-IN" in report
    assert report.count("<img") == 3 + TEST_IMAGES * 4  # chart, masks, training curves; stimulus | structural | fused | semantic, every image
    assert "<h2>Masks</h2>" in report  # the synthetic subject's ROIs, from its prepared record
    assert "Modes compared" in report and "synthetic subject 1" in report
    assert set(summary["skipped"]) >= {"alexnet2", "clip", "swav"} or not summary["skipped"]
    assert "the per-image mean of 3 runs, each trained on its own shuffle" in page
    assert [run["seed"] for run in summary["null_runs"].values()] == [0, 1, 2]
    for name, run in summary["null_runs"].items():  # the null's numbers are the mean of its runs'
        for mode, scores in run["modes"].items():
            assert set(scores) == set(summary["null_modes"][mode])
    for mode, scores in summary["null_modes"].items():
        for metric, value in scores.items():
            runs = [run["modes"][mode][metric] for run in summary["null_runs"].values()]
            assert value == pytest.approx(sum(runs) / 3, abs=2e-4), (mode, metric)
        runs = [run["demo_measures"][mode]["mini_clip_identification"] for run in summary["null_runs"].values()]
        assert _measure(summary, "null", mode, "mini_clip_identification") == pytest.approx(sum(runs) / 3, abs=2e-4)
    for recon in ("recon", "recon-null", "recon-null-2", "recon-null-3"):
        for mode in ("structural", "fused", "semantic"):
            assert len(list((demo_result / recon / mode).glob("*.png"))) == TEST_IMAGES
