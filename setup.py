"""Installs sbpatch.pth next to the package so that ``SBPATCH=all python script.py`` enables sbpatch at start-up.

The .pth line costs a dictionary lookup and a string comparison when SBPATCH is unset or off (0, false, none...):
it imports nothing else (the pytest-cov pattern). Its list of off values is config.OFF_VALUES (a test keeps them equal).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "sbpatch.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})
