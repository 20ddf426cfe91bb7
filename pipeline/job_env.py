"""Where a job runs: from the user's checkout, or from the copy of it that
`ray job submit --working-dir .` uploads.

Ray unpacks the uploaded working dir under its session folder
(`<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/`) and runs
the job there. A relative path then means a place inside that copy: an output written
there (the default `--storage runs`) is deleted with the cluster, so the run "succeeds"
and its checkpoints are gone; an input under a git-ignored folder (`runs/`, data) was never
uploaded. Jobs refuse both before doing any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from distilpose.errors import UserError
from pipeline import storage

WORKING_DIR_FOLDER = "working_dir_files"  # Ray's folder of unpacked working dirs


def in_uploaded_working_dir(cwd: str | None = None) -> bool:
    """True when the job runs from a working dir Ray unpacked (not from the user's files)."""
    parts = os.path.normpath(cwd or os.getcwd()).split(os.sep)
    return WORKING_DIR_FOLDER in parts and "runtime_resources" in parts


def check_job_paths(
    outputs: Mapping[str, str | None], inputs: Mapping[str, str | None], cwd: str | None = None
) -> None:
    """Refuse, under an uploaded working dir, relative local outputs and relative inputs that
    are not in the upload. Keys are the flags that name the paths (`--storage`)."""
    if not in_uploaded_working_dir(cwd):
        return
    base = cwd or os.getcwd()
    bad = [f"{flag} {path} (output)" for flag, path in outputs.items() if _relative(path)]
    bad += [
        f"{flag} {path} (not in the uploaded files)"
        for flag, path in inputs.items()
        if _relative(path) and not os.path.exists(os.path.join(base, path))
    ]
    if bad:
        raise UserError(
            f"{'; '.join(bad)}: this job runs from the copy of the repo that `--working-dir` uploaded, "
            "which has no git-ignored files and is deleted with the cluster; pass an absolute path "
            '(e.g. "$PWD/runs/...") or an s3:// URI'
        )


def _relative(path: str | None) -> bool:
    if not path or storage.is_s3(path):
        return False
    if path.startswith(storage.FILE_PREFIX):
        path = path[len(storage.FILE_PREFIX) :]
    return not os.path.isabs(os.path.expanduser(path))


def data_inputs(cfg) -> dict[str, str | None]:
    """The data-source paths of a job's config (DataOptions, ValDataOptions), by flag."""
    flags = {
        "data": "--data",
        "ann_file": "--ann-file",
        "images": "--images",
        "val": "--val",
        "val_ann_file": "--val-ann-file",
        "val_images": "--val-images",
    }
    return {flag: getattr(cfg, name) for name, flag in flags.items() if hasattr(cfg, name)}
