"""The Flower app folder `flwr run` bundles: fedmeta's checkout, and a staged copy of the files its bundle holds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

import fedmeta.simulations


def source_app_dir() -> Path:
    """The checkout this fedmeta runs from: the Flower app folder `flwr run` bundles.

    Raises when fedmeta was installed from a wheel (no pyproject.toml beside the packages): Flower's
    engines need the app's source folder; the in-process engine does not.
    """
    root = Path(fedmeta.simulations.__file__).resolve().parents[1]  # simulations/__init__.py -> the checkout
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"Flower's engines build the app from fedmeta's source folder, but {root} has no pyproject.toml "
            "(fedmeta was installed from a wheel); run from a checkout (pip install -e .) or use the in-process engine."
        )
    return root


_STAGED_MARK = ".fedmeta-staged-app"  # marks a folder stage_app made (and may replace); no FAB holds such a file


def stage_app(app_dir: Path, dest: Path, *, exclude: Iterable[Path] = ()) -> Path:
    """Copy the files of `app_dir` a Flower app bundle (FAB) can hold into `dest`, and return `dest`.

    Flower's own rules choose the files (``filter_paths_for_publish``: the app's .gitignore, read as
    Flower reads it, and the publish include/exclude patterns; links skipped, as Flower skips them),
    so the bundle built from `dest` is byte for byte the one `app_dir` gives. What makes it fast:
    whole folders the .gitignore ignores are not walked (unless a ``!`` pattern could bring a file
    below one back), nor virtual environments (a folder holding pyvenv.cfg), the folders in `exclude`
    (a FLWR_HOME inside the app) and `dest` itself. `.git` is walked: Flower ships the .toml/.json
    files it may hold. Only regular files are read (no pipes, sockets). `dest` must not be the app
    folder or hold it, and is replaced only if stage_app made it.
    """
    app_dir = _check_app_dir(app_dir)
    dest = Path(dest).expanduser().resolve()
    if dest == app_dir or app_dir.is_relative_to(dest):
        raise ValueError(f"cannot stage the Flower app into {dest}: it is the app folder {app_dir} or holds it; "
                         "stage into a folder of its own.")
    if dest.exists():
        if not (dest / _STAGED_MARK).is_file():
            raise FileExistsError(f"cannot stage the Flower app into {dest}: it exists and was not made by "
                                  "stage_app (no " + _STAGED_MARK + "); choose a new folder.")
        shutil.rmtree(dest)
    skip = {Path(p).expanduser().resolve() for p in exclude} | {dest}
    gitignore = app_dir / ".gitignore"
    patterns = load_gitignore_patterns(gitignore) if gitignore.is_file() and not gitignore.is_symlink() else []
    negated = any(line.lstrip().startswith("!") for line in patterns)
    prune = build_pathspec([] if negated else patterns)
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(app_dir, followlinks=False):
        here = Path(folder)
        relative = here.relative_to(app_dir)
        subfolders[:] = [
            name for name in subfolders
            if not (here / name).is_symlink() and not (here / name / "pyvenv.cfg").exists()
            and (here / name) not in skip and not prune.match_file((relative / name).as_posix() + "/")
        ]
        for name in names:
            source = here / name
            if not source.is_symlink() and source.is_file():
                files[(relative / name).as_posix()] = source
    kept = filter_paths_for_publish(files)
    dest.mkdir(parents=True)
    (dest / _STAGED_MARK).write_text(f"a copy of {app_dir} for `flwr run`; replaced at every run\n")
    for relative_name, source in kept.items():
        target = dest / relative_name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except OSError as err:
            raise OSError(f"staging the Flower app: cannot copy {source} ({err.strerror or err}); make it readable "
                          "or add it to the app's .gitignore.") from err
    return dest


def _check_app_dir(app_dir: Path) -> Path:
    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"{pyproject} not found: app_dir must be a Flower app folder (the fedmeta "
            "repository root, which holds [tool.flwr.app.components])."
        )
    return app_dir
