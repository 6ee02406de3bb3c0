"""The rules of the stages' options, as data, in a module that imports nothing heavy.

Each stage checks its own options (a notebook calling the library is refused like the command
line); the command line checks them too, first, before it looks at any file and before it imports
torch and the models (seconds): a bad option, then a missing input, are each said at once.
"""

from __future__ import annotations

from havir.artifacts.prepared import NORMALISATIONS
from havir.models.backbone import MODES
from havir.validation import Interval, Matches, OneOf, Rule

#: ``--device``, as written (:func:`havir.devices.resolve_device` also checks that the GPU is there).
DEVICE_OPTIONS: dict[str, Rule] = {"device": Matches(r"auto|(cpu|cuda)(:\d+)?", "auto, cpu, cuda or cuda:N")}

#: ``havir prepare``'s options (``--sessions`` is also checked against the sessions on disk).
PREPARE_OPTIONS: dict[str, Rule] = {
    "sessions": Interval(int, 1, optional=True),
    "betas_format": OneOf("auto", "hdf5", "nifti"),
    "normalisation": OneOf(*NORMALISATIONS),
    "workers": Interval(int, 1),
}

#: ``havir encode``'s options.
ENCODE_OPTIONS: dict[str, Rule] = {
    "folds": Interval(int, 2),
    "seed": Interval(int, 0, 2**32 - 1),
    "control": OneOf(None, "shuffled"),
}

#: ``havir features``' numeric options.
FEATURES_OPTIONS: dict[str, Rule] = {"batch_size": Interval(int, 1), "seed": Interval(int, 0, 2**32 - 1)}

#: ``havir reconstruct``'s options besides the sampler's.
RECONSTRUCT_OPTIONS: dict[str, Rule] = {
    "mode": OneOf(*MODES),
    "limit": Interval(int, 1, optional=True),
    "batch_size": Interval(int, 1),
    "candidates": Interval(int, 1),
}
# The sampler's settings are checked by :class:`~havir.models.backbone.SamplerSettings` itself
# (a light module too), the modes are the backbone's.


def check_subject_list(subjects: tuple[int, ...], option: str = "--subjects") -> None:
    """The subjects of a multi-subject command: at least one, each an NSD subject, none twice."""
    from havir.errors import InvalidInputError
    from havir.nsd.layout import check_subject

    if not subjects:
        raise InvalidInputError(f"{option} names no subject: name one or more, such as 1,2,5,7")
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:
        raise InvalidInputError(f"{option} {','.join(map(str, subjects))} names subject {repeated[0]} more than once: name each subject once")
    for subject in subjects:
        check_subject(subject)
