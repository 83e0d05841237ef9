"""Reading and verifying a bundle written by ``saminv export`` (numpy + onnxruntime only, no torch).

:func:`open_bundle` checks, before anything runs: manifest.json is readable JSON of the saminv bundle
format this runtime understands; every file it lists exists and has the recorded sha256; every ONNX
file declares exactly the inputs and outputs (names and non-batch shapes) the manifest records. Any
failure is a :class:`BundleError` with one line naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from saminv.errors import InputError
from saminv.imageio import file_sha256

FORMAT = "saminv-bundle"
SUPPORTED_VERSIONS = (1,)


class BundleError(InputError):
    """A missing, corrupt or mismatched bundle file (the message is one line)."""


@dataclass
class Bundle:
    """A verified bundle: its directory and manifest (see :mod:`saminv.export.onnx_bundle`)."""

    path: Path
    manifest: dict

    def stage(self, name: str) -> dict:
        """The manifest entry of stage ``name`` ("mapping", "F<k>" or "tail"); raises BundleError if absent."""
        for s in self.manifest["stages"]:
            if s["name"] == name:
                return s
        raise BundleError(f"{self.path}: manifest has no stage {name!r}")

    @property
    def synthesis_stages(self) -> list[dict]:
        """The manifest entries of the synthesis stages g_{i->j}, in the order they run."""
        return [s for s in self.manifest["stages"] if s["name"] != "mapping"]


def open_bundle(path: str | Path) -> Bundle:
    """Read and verify the bundle directory ``path``; raises BundleError (one line) on any problem."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest.json (not a saminv bundle)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: unreadable manifest ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not a saminv bundle manifest")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise BundleError(f"{manifest_path}: bundle format version {manifest.get('version')!r}; "
                          f"this runtime reads {', '.join(map(str, SUPPORTED_VERSIONS))} (re-export with this saminv)")
    for key in ("resolution", "n_latent", "w_dim", "z_dim", "stages", "files", "w_avg", "spaces"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: manifest lacks {key!r}")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (listed in manifest.json)")
        if file_sha256(file) != digest:
            raise BundleError(f"{file}: sha256 does not match manifest.json (corrupt or replaced file)")
    for stage in manifest["stages"] + manifest.get("networks", []):
        if stage.get("file") not in manifest["files"]:
            raise BundleError(f"{manifest_path}: stage {stage.get('name')!r} has no verified file")
    return Bundle(path, manifest)


def check_session_io(session, stage: dict, file: Path) -> None:
    """Raise BundleError unless the ONNX session's inputs/outputs match the manifest (names, non-batch shapes)."""
    for kind, declared, actual in (("input", stage["inputs"], session.get_inputs()),
                                   ("output", stage["outputs"], session.get_outputs())):
        got = {a.name: list(a.shape[1:]) for a in actual}
        want = {k: list(v[1:]) for k, v in declared.items()}
        if got != want:
            raise BundleError(f"{file}: {kind}s {got} do not match manifest.json {want}")
