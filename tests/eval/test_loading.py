"""The tokenizer a checkpoint stores is rebuilt from its files; a crafted file name is refused."""

import pytest

from qat.errors import CheckpointError
from qat.eval.loading import tokenizer_from_files


def test_a_checkpoints_tokenizer_is_rebuilt_from_its_files():
    from qat.data.datamodule import TextDataModule

    data = TextDataModule()
    files = {p.name: p.read_text() for p in data.tokenizer_path.iterdir() if p.is_file()}
    rebuilt = tokenizer_from_files(files)
    text = "Albedo is the fraction of sunlight that is reflected."
    assert rebuilt(text)["input_ids"] == data.tokenizer(text)["input_ids"]
    assert rebuilt.eos_token_id == data.tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["../tokenizer.json", "/tmp/tokenizer.json", ".."])
def test_a_tokenizer_file_name_outside_the_folder_is_refused(name, tmp_path):
    with pytest.raises(CheckpointError, match="unsafe tokenizer file name"):
        tokenizer_from_files({name: "{}"})
    with pytest.raises(CheckpointError, match="stores no tokenizer files"):
        tokenizer_from_files({})
