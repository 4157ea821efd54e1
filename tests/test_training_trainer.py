"""Training the tiny reference model: prompt layout, loss goes down, MVM alignment, checkpoints."""

import pytest
import torch
from torch import nn

from stllm_engine.datasets import build_dataset
from stllm_engine.reference import ReferenceSTLLM
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.training import MaskingConfig, TrainConfig, Trainer
from stllm_engine.training.model import load_trainable
from stllm_engine.training.step import assemble, forward_step
from stllm_engine.training.train import main as train_main
from stllm_engine.weights import load_checkpoint
from stllm_engine.weights.keys import MVM_PREFIX

NO_MASK = MaskingConfig(enabled=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0, num_frames=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build_dataset(out, n_train=2, n_test=1, seed=0, num_frames=14, size=32,
                  tasks=("Moving Direction", "Object Colour"))
    return out


def _cfg(ckpt, data, out, **kw):
    base = dict(data=str(data), init=str(ckpt), out=str(out), steps=3, batch_size=2, lr=3e-3,
                warmup_steps=0, save_every=100, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_prompt_layout_matches_reference_mvbench(ckpt, data, tmp_path):
    t = Trainer(_cfg(ckpt, data, tmp_path, masking=NO_MASK))
    ex = t.dataset[0]
    with torch.no_grad():
        video = t.model.video_tokens(ex.frames, ex.qformer_text)
        ours = assemble(t.model, [ex], video[None])
        ref = t.model.reference.mvbench_inputs_embeds(video, ex.qformer_text)[0]
        torch.testing.assert_close(video, t.model.reference.encode_video(ex.frames, ex.qformer_text))
    n = ref.shape[0]
    torch.testing.assert_close(ours.embeds[0, :n], ref)
    labels = ours.labels[0]
    assert (labels[:n] == -100).all() and labels[n:].tolist() == ex.ids.target
    assert t.model.reference.llama_tokenizer.decode(ex.ids.target[:-1]).strip() == \
        f"{t.dataset.items[0].answer_letter}) {t.dataset.items[0].answer}"
    assert ex.ids.target[-1] == t.model.config.llm.eos_token_id


def test_steps_lower_the_loss_on_a_fixed_batch(ckpt, data, tmp_path):
    t = Trainer(_cfg(ckpt, data, tmp_path, masking=NO_MASK, steps=10))
    batch = [t.dataset[i] for i in (0, 3)]
    with torch.no_grad():
        before = forward_step(t.model, batch, None, False).lm
    for _ in range(4):
        t.train_step([0, 3])
    with torch.no_grad():
        after = forward_step(t.model, batch, None, False).lm
    assert after < before - 0.5, (before, after)


def test_masked_step_with_mvm(ckpt, data, tmp_path):
    t = Trainer(_cfg(ckpt, data, tmp_path))
    lv = t.model.config.num_frames * t.model.config.qformer.num_query_tokens
    out = t.train_step([1, 2])
    assert 0.1 <= out.mask_rate <= 0.7 and out.video_tokens == lv - int(out.mask_rate * lv)
    assert out.mvm is not None and 0.0 < out.mvm < 4.0
    assert float(out.loss.detach()) == pytest.approx(out.lm + out.mvm, rel=1e-5)


def test_mvm_target_positions_align(ckpt, data, tmp_path):
    """Identity decoder + nothing dropped: masked and unmasked runs coincide, so MVM is 0."""
    t = Trainer(_cfg(ckpt, data, tmp_path))
    t.model.mvm_decoder = nn.Identity()
    batch = [t.dataset[i] for i in (0, 2)]
    with torch.no_grad():
        zero = forward_step(t.model, batch, 0.0, True, torch.Generator().manual_seed(0))
        half = forward_step(t.model, batch, 0.5, True, torch.Generator().manual_seed(0))
    assert zero.mvm == pytest.approx(0.0, abs=1e-5)
    assert half.mvm > 1e-3 and half.video_tokens == zero.video_tokens // 2


def test_saved_checkpoint_loads_everywhere(ckpt, data, tmp_path):
    t = Trainer(_cfg(ckpt, data, tmp_path / "run"))
    t.train_step([0, 1])
    folder = t.save(tmp_path / "saved")
    full = load_checkpoint(folder, mvm_decoder=True, progress=False)
    assert full.config.mvm_decoder and full.variant == "eva/all"
    ours = t.model.official_state_dict()
    assert set(full.state_dict) == set(ours)
    assert any(k.startswith(MVM_PREFIX) for k in ours)
    for k, v in ours.items():
        assert torch.equal(full.state_dict[k], v), k
    plain = load_checkpoint(folder, progress=False)
    assert not any(k.startswith(MVM_PREFIX) for k in plain.state_dict)
    ref = ReferenceSTLLM.from_pretrained(folder)
    ex = t.dataset[0]
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_video(ex.frames, ex.qformer_text),
                                   t.model.video_tokens(ex.frames, ex.qformer_text))


def test_cli_resume_matches_uninterrupted(ckpt, data, tmp_path):
    """Stop after 2 of 3 steps, resume with the CLI: same weights as an uninterrupted run."""
    args = ["--data", str(data), "--init", str(ckpt), "--batch-size", "1", "--lr", "3e-3",
            "--warmup", "1", "--save-every", "100", "--log-every", "1", "--steps", "3"]
    t = Trainer(_cfg(ckpt, data, tmp_path / "a", batch_size=1, warmup_steps=1))
    t.train_step()
    t.train_step()
    t.save(tmp_path / "a/checkpoint-000002")  # as if the run had been killed here
    train_main(args + ["--out", str(tmp_path / "a")])
    train_main(args + ["--out", str(tmp_path / "b")])
    a = load_checkpoint(tmp_path / "a/final", mvm_decoder=True, progress=False).state_dict
    b = load_checkpoint(tmp_path / "b/final", mvm_decoder=True, progress=False).state_dict
    init = load_checkpoint(ckpt, progress=False).state_dict
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a["lm_head.weight"], init["lm_head.weight"].float())
    assert len((tmp_path / "a/log.jsonl").read_text().splitlines()) == 1  # only step 3 ran there
    assert len((tmp_path / "b/log.jsonl").read_text().splitlines()) == 3


def test_only_selected_parts_train(ckpt, data, tmp_path):
    t = Trainer(_cfg(ckpt, data, tmp_path, train=("projector",), masking=NO_MASK))
    before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    t.train_step([0, 1])
    changed = {k for k, v in t.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("reference.llama_proj.") for k in changed)


@pytest.mark.parametrize("video_input,tokens", [("mean", 6), ("residual", 24), ("all", 24)])
def test_video_input_switch(ckpt, video_input, tokens):
    m = load_trainable(ckpt, video_input=video_input)
    base = load_trainable(ckpt)
    frames = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        out = m.video_tokens(frames, "Question: where?")
        per_frame = base.video_tokens(frames, "Question: where?").view(4, 6, -1)
    assert out.shape == (tokens, 64) and m.config.video_input == video_input
    if video_input == "mean":
        torch.testing.assert_close(out, per_frame.mean(0))
    else:  # residual starts with up_proj = 0: local frames only (here all 4 of them)
        torch.testing.assert_close(out, per_frame.reshape(-1, 64))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(lr=0.0), dict(grad_clip=0.0),
                                 dict(video_input="frames"), dict(train=("eyes",)), dict(min_lr_ratio=2.0)])
def test_train_config_errors(bad):
    with pytest.raises(ValueError):
        TrainConfig(data="d", init="i", out="o", **bad)


def test_frame_recon_auxiliary_loss(ckpt, data, tmp_path):
    """--recon: loss = lm + w * recon; the head trains, resumes from trainer_state, and never
    reaches the official folder; with it off the step is unchanged."""
    from stllm_engine.training.losses import FrameReconHead, frame_recon_loss

    t = Trainer(_cfg(ckpt, data, tmp_path / "run", masking=NO_MASK, recon=2.0, recon_grid=4))
    assert isinstance(t.recon_head, FrameReconHead)
    batch = [t.dataset[i] for i in (0, 1)]
    with torch.no_grad():
        on = forward_step(t.model, batch, None, False, None, t.recon_head, 2.0)
        off = forward_step(t.model, batch, None, False)
        tokens = t.model.frame_tokens(batch[0].frames, batch[0].qformer_text)
        manual = frame_recon_loss(t.recon_head(tokens), batch[0].frames)
    assert off.recon is None and on.recon > 0 and on.lm == pytest.approx(off.lm, rel=1e-6)
    assert float(on.loss) == pytest.approx(on.lm + 2.0 * on.recon, rel=1e-5)
    assert tokens.shape[:2] == (t.model.config.num_frames, t.model.config.qformer.num_query_tokens)
    assert manual > 0
    head_before = t.recon_head.head.weight.detach().clone()
    out = t.train_step([0, 1])
    assert out.recon is not None and not torch.equal(t.recon_head.head.weight, head_before)
    folder = t.save(tmp_path / "run" / "checkpoint-000001")
    assert set(load_checkpoint(folder, mvm_decoder=True, progress=False).state_dict) == \
        set(t.model.official_state_dict())  # no recon keys in the official folder
    resumed = Trainer(_cfg(ckpt, data, tmp_path / "run", masking=NO_MASK, recon=2.0, recon_grid=4))
    assert resumed.step == 1
    assert torch.equal(resumed.recon_head.head.weight, t.recon_head.head.weight)


def test_train_config_recon_errors():
    with pytest.raises(ValueError):
        TrainConfig(data="d", init="i", out="o", recon=-1.0)
    with pytest.raises(ValueError):
        TrainConfig(data="d", init="i", out="o", recon_grid=0)
