"""Publishing labels and pairs Parquet files as a Hugging Face Hub dataset (``data/{split}-00000-of-00001.parquet``
plus a ``README.md`` card), through ``huggingface_hub``. The token is resolved by ``huggingface_hub`` itself
(``HF_TOKEN`` or the saved login); this module never reads it, and :func:`scrub` keeps it out of recorded text."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from icm.data.io import InputError, read_parquet_metadata, regular_file, scrub, scrub_all  # noqa: F401  (re-exported)

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repository id must look like OWNER/NAME, got '{repo_id}'")
    return repo_id


def hub_path(split: str) -> str:
    """Where a split's single Parquet shard lives in the repository (the layout ``datasets`` resolves by itself)."""
    return f"data/{split}-00000-of-00001.parquet"


def split_files(path: str | Path) -> dict[str, Path]:
    """Split name -> file for an existing labels or pairs Parquet file: a pairs file written with a test split
    brings its sibling (named in its ``icm`` metadata); anything else is the train split."""
    path = regular_file(path)
    metadata = read_parquet_metadata(path)  # an unreadable file or damaged metadata: an InputError
    names = metadata.get("splits") or {"train": path.name}
    files = {split: path if split == metadata.get("split") else path.parent / name for split, name in names.items()}
    for split, file in files.items():
        if not file.is_file():
            raise InputError(path, f"the {split} split '{file}' named in its metadata is missing", field="splits")
    return files


def write_hub_folder(files: dict[str, Path], card: str, output_dir: str | Path) -> dict[str, Path]:
    """Write exactly what :func:`push_to_hub` uploads into ``output_dir``: ``README.md`` (the card) and each split's
    file at its Hub path, so ``datasets.load_dataset(output_dir)`` reads the same splits as the Hub would. Returns
    path in the repository -> written file."""
    import shutil

    from icm.data.io import atomic_path, check_output

    output_dir = Path(output_dir)
    written = {hub_path(split): output_dir / hub_path(split) for split in files} | {"README.md":
                                                                                     output_dir / "README.md"}
    for target in written.values():
        check_output(target, *files.values())
    for split, file in files.items():
        target = written[hub_path(split)]
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(file, tmp)
    with atomic_path(written["README.md"]) as tmp:
        Path(tmp).write_text(card, encoding="utf-8")
    return written


def push_to_hub(files: dict[str, Path], repo_id: str, *, card: str, private: bool = False,
                revision: str | None = None, api: HfApi | None = None) -> str:
    """Upload split name -> local Parquet file, and ``card`` as README.md, to the dataset repo ``repo_id`` in one
    commit (creating the repo, and the ``revision`` branch, if needed). Returns the commit URL."""
    check_repo_id(repo_id)
    api = api or HfApi()
    repo_url = api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id=repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=hub_path(split), path_or_fileobj=str(file))
                  for split, file in files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="dataset", revision=revision,
                             commit_message=f"Upload {', '.join(files)} with icm")
    return str(getattr(info, "commit_url", None) or repo_url)
