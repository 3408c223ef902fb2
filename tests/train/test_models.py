import torch

from core.models import load_causal_lm
from train import models


def test_lora_merge_matches_peft(tiny_model):
    lm = load_causal_lm(str(tiny_model))
    peft_model = models.add_lora(lm, dim=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj")
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.02)
    merged = models.merge_lora_state_dict(dict(peft_model.state_dict()), scaling=8.0 / 4)
    expected = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)


def test_saved_weights_never_go_through_a_link_planted_beside_the_folder(tmp_path, tiny_model):
    """Issue 14 (fourth probe, finding 4): the save wrote into `final.tmp`, a name anyone could
    plant a link at, then renamed it over final/."""
    from core.models import load_tokenizer

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.tmp").symlink_to(victim, target_is_directory=True)
    lm = load_causal_lm(str(tiny_model))
    models.save_hf(dict(lm.state_dict()), lm, load_tokenizer(str(tiny_model)), run / "final", None)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (run / "final").is_dir() and not (run / "final").is_symlink()
    assert (run / "final" / "model.safetensors").is_file()
    assert load_causal_lm(str(run / "final")) is not None
