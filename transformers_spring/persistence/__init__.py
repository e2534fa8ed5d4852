"""Persistence: how every save of the library writes into a folder and how every load finds its files."""

from .folder import (
    MANIFEST_FILE,
    UnsafeSaveError,
    check_save_directory,
    component,
    read_manifest,
    recover,
    save_folder,
)

__all__ = [
    "MANIFEST_FILE",
    "UnsafeSaveError",
    "check_save_directory",
    "component",
    "read_manifest",
    "recover",
    "save_folder",
]
