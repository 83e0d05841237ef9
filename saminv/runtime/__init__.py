"""The lean, torch-free runtime for bundles written by ``saminv export`` (numpy + onnxruntime)."""

from saminv.runtime.bundle import Bundle, BundleError, open_bundle
from saminv.runtime.runtime import Runtime, RuntimeCodes, RuntimeInversion, load_codes

__all__ = ["Bundle", "BundleError", "Runtime", "RuntimeCodes", "RuntimeInversion", "load_codes", "open_bundle"]
