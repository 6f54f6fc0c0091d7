"""The model store: versioned, verifiable folders of exported AToP pipelines.

Imports neither torch nor training code: the service reads the store with this package alone.
``default_store()`` is this package's own folder, which holds the embedded default model.
"""

from model_store.manifest import (
    MANIFEST_FILE,
    canonical_bytes,
    clean_figure,
    manifest_digest,
    serving_samples,
    validate,
)
from model_store.store import (
    ModelVersion,
    StoreError,
    cleanup,
    default_store,
    get_version,
    list_versions,
    load_manifest,
    publish,
    sha256_file,
    verify,
    version_dirs,
)

__all__ = [
    "MANIFEST_FILE",
    "ModelVersion",
    "StoreError",
    "canonical_bytes",
    "clean_figure",
    "cleanup",
    "default_store",
    "get_version",
    "list_versions",
    "load_manifest",
    "manifest_digest",
    "publish",
    "serving_samples",
    "sha256_file",
    "validate",
    "verify",
    "version_dirs",
]
