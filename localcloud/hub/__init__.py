"""A Hugging Face Hub API over model repositories kept in a local folder.

`HubRepos` stores repositories with git-style commits, branches, tags and LFS metadata;
`HubServer` serves them over the HTTP API that `huggingface_hub` calls.
"""

from localcloud.hub.repos import (
    CommitInfo,
    EntryNotFoundError,
    FileEntry,
    HubError,
    HubRepos,
    InvalidNameError,
    LfsPointer,
    RefConflictError,
    RepoNotFoundError,
    RepoRefs,
    RevisionNotFoundError,
)
from localcloud.hub.server import HubServer

__all__ = [
    "CommitInfo",
    "EntryNotFoundError",
    "FileEntry",
    "HubError",
    "HubRepos",
    "HubServer",
    "InvalidNameError",
    "LfsPointer",
    "RefConflictError",
    "RepoNotFoundError",
    "RepoRefs",
    "RevisionNotFoundError",
]
