"""`qlora-kfp demo-assets DIR` adds the demo model and data; it never replaces what is there."""

from __future__ import annotations

import pytest

from qlora_kfp.errors import ArtifactError


def test_demo_assets_never_overwrite_a_model_folder(tmp_path):
    from qlora_kfp.app.demo import make_demo_assets

    mine = tmp_path / "tiny-llama"
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"mine": true}')
    (mine / "model.safetensors").write_bytes(b"my weights")
    with pytest.raises(ArtifactError, match="tiny-llama: holds files that are not an artifact"):
        make_demo_assets(tmp_path)
    assert (mine / "tokenizer.json").read_text() == '{"mine": true}'
    assert (mine / "model.safetensors").read_bytes() == b"my weights"
