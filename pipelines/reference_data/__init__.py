"""The public reference data shipped with fbmem (see NOTICE.md here): the prompt sets of the NeMo
repository and SD 1.4's activation statistics, found by name so that they work offline.

`fbmem ingest prompts memorized-laion` and `fbmem nemo stats --from-csv sd14` name them; a path
that exists is always taken as a path first.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PROMPT_SETS: dict[str, str] = {
    "memorized-laion": "memorized_laion_prompts.csv",
    "ordinary-laion": "unmemorized_laion_prompts.csv",
}
STATISTICS: dict[str, str] = {"sd14": "sd14_to_v_activation_stats.csv"}
# sha256 of each shipped file as published: a copy that drifted is caught by the tests.
CHECKSUMS: dict[str, str] = {
    "memorized_laion_prompts.csv": "0b527a5965dc463e7a3e0d234ff7fd5489b1a76869c456dbb209dc753cb4af25",
    "unmemorized_laion_prompts.csv": "f453b418cc157864baacbf68d97447273feac41e8066b2ead6b307bf795988e1",
    "sd14_to_v_activation_stats.csv": "c7d064638240f72c45f8415f929c47e9dfaf7003f9ed79b5ef3a3daa28b399c4",
}


def _path(file: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(file)))


def resolve(name_or_path: str | Path, names: dict[str, str]) -> Path:
    """A shipped file by its name, or the given path. A name that is neither is an error that
    lists the names, so a typo does not read as a missing file."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in names:
        return _path(names[str(name_or_path)])
    raise FileNotFoundError(
        f"{name_or_path}: no such file, and not a shipped reference name ({', '.join(sorted(names))})"
    )


def prompt_set_path(name_or_path: str | Path) -> Path:
    return resolve(name_or_path, PROMPT_SETS)


def statistics_path(name_or_path: str | Path) -> Path:
    return resolve(name_or_path, STATISTICS)
