"""The README's Python examples run as written (a user's first copy-and-paste), given the input
tensors they leave to the reader."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def inputs_for(code):
    """The tensors an example takes as given: images for the image flow, 2-d points else."""
    if "(3, 32, 32)" in code:
        return {"x": torch.rand(4, 3, 32, 32)}
    return {"x": torch.randn(8, 2)}


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.filterwarnings("error")  # an example that warns would puzzle its first reader
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):  # capsys: the examples print
    torch.manual_seed(0)
    code = BLOCKS[index]
    exec(compile(code, f"README.md example {index + 1}", "exec"), inputs_for(code))
