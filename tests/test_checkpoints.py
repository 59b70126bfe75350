"""Which checkpoint a resumed run starts from: `last` skips checkpoints whose save was interrupted."""

from __future__ import annotations

import json
import logging

import pytest

from dts_llm.checkpoints import latest_complete_checkpoint, resume_checkpoint


def checkpoint(root, step: int, state_step: int | None = None, state: bool = True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if state:
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step if state_step is None else state_step})
        )
    return folder


@pytest.mark.parametrize("requested", [True, "true", "last", "LAST"])
def test_last_is_the_highest_complete_checkpoint_and_skips_interrupted_saves(tmp_path, requested, caplog):
    checkpoint(tmp_path, 9)
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 100, state=False)  # interrupted while saving: trainer_state.json is written last
    checkpoint(tmp_path, 20, state_step=10)  # a state file that belongs to another step
    (tmp_path / "checkpoint-30").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        assert resume_checkpoint(requested, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-100: it has no trainer_state.json" in caplog.text
    assert "checkpoint-20: it has a trainer_state.json of step 10, not 20" in caplog.text


@pytest.mark.parametrize("requested", [None, False, "", "false", "False"])
def test_no_resume_starts_afresh(tmp_path, requested):
    checkpoint(tmp_path, 3)
    assert resume_checkpoint(requested, str(tmp_path)) is None


def test_a_named_checkpoint_must_be_complete(tmp_path):
    good = checkpoint(tmp_path, 3)
    assert resume_checkpoint(str(good), str(tmp_path / "elsewhere")) == str(good)
    broken = checkpoint(tmp_path, 6, state=False)
    with pytest.raises(ValueError, match=r"checkpoint-6 has no trainer_state.json \(written last"):
        resume_checkpoint(str(broken), str(tmp_path))
    (good / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"checkpoint-3 has an unreadable trainer_state.json"):
        resume_checkpoint(str(good), str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        resume_checkpoint(str(tmp_path / "missing"), str(tmp_path))


def test_an_output_dir_given_as_the_checkpoint_gets_a_hint(tmp_path):
    checkpoint(tmp_path, 3)
    with pytest.raises(ValueError, match="it holds checkpoint folders: pass one of them, or `last`"):
        resume_checkpoint(str(tmp_path), str(tmp_path))


def test_last_without_a_complete_checkpoint_names_the_folder(tmp_path):
    checkpoint(tmp_path, 4, state=False)
    with pytest.raises(ValueError, match=f"no complete checkpoint in {tmp_path}"):
        latest_complete_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume_checkpoint("last", str(tmp_path / "never-created"))
