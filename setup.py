"""Build hook: the run-time configs ship inside the package.

``configs/*.yaml`` (the demo's student and teacher, the paper recipe) stay at the repository's top level,
where the README's commands name them, and are copied into the wheel as ``siclip/configs/``, so an
installed ``siclip demo`` finds them without a checkout. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "siclip" / "configs"
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(__file__).resolve().parent.joinpath("configs").glob("*.yaml")):
            shutil.copy2(path, dest / path.name)


setup(cmdclass={"build_py": BuildPyWithConfigs})
