"""The video-side CUDA graphs' host side, on the CPU: which shapes share a graph, that a replay
reads its inputs from the static buffers (a stand-in whose "replay" runs the captured function on
them), the graph limits, and a failed capture falling back to eager passes. The captures
themselves run in tests/test_engine_cuda.py on a GPU."""
from __future__ import annotations

import pytest
import torch

from stllm_engine.engine.video_graphs import CapturedPass, VideoGraphs
from stllm_engine.model import STLLMModel
from stllm_engine.testing.checkpoints import write_tiny_checkpoint
from stllm_engine.weights import load_checkpoint
from test_engine import make_engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vgraphs") / "ckpt", vit="eva",
                                 video_input="all", seed=5)


@pytest.fixture(scope="module")
def model(folder):
    return STLLMModel.from_checkpoint(load_checkpoint(folder, progress=False), "cpu", torch.float32)


class EagerReplays(VideoGraphs):
    """VideoGraphs whose 'replay' runs the captured function on the static input buffers."""

    captures = 0

    @staticmethod
    def _check_device(model) -> None:
        pass

    def _capture(self, fn, inputs):
        self.captures += 1
        g = CapturedPass(replay=lambda: None, inputs=inputs, output=None)

        def replay():
            g.output = fn(*g.inputs)
        g.replay = replay
        return g


def frames_like(model, t, seed):
    s = model.config.vision.image_size
    return torch.randn(t, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_cpu_models_are_not_captured(model, folder):
    with pytest.raises(ValueError, match="CUDA"):
        VideoGraphs(model)
    with pytest.raises(ValueError, match="max_vision"):
        EagerReplays(model, max_vision=-1)
    eng = make_engine(folder)
    assert eng.video_graphs is None and eng.kernels()["video_pass"] == "eager"


def test_replays_read_their_inputs_and_equal_eager_passes(model):
    g = EagerReplays(model)
    t = model.config.num_frames
    for seed in range(3):  # the first call runs eagerly and captures; the next two replay
        frames = frames_like(model, t, seed)
        torch.testing.assert_close(g.encode_vision(frames), model.encode_vision(frames), rtol=0, atol=0)
    assert g.captures == 1 and g.replays["vision"] == 2
    embeds = model.encode_vision(frames_like(model, t, 9))
    # same number of Q-Former tokens, different words: one graph, each question's own tokens
    questions = ["what is moving?", "what is red?", "where is it?", "which shape is the biggest one?"]
    ids = [model.qformer_ids(q).numel() for q in questions]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    outs = [g.encode_video(embeds, q) for q in questions]
    for q, out in zip(questions, outs):
        torch.testing.assert_close(out, model.encode_video(embeds, q), rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[1])
    assert len(g.graphs["qformer"]) == 2 and g.replays["qformer"] == 2 and g.captures == 3
    # the two Q-Former graphs share one image-embeddings buffer; replaying the first after the
    # second was captured still reads this call's embeddings
    (k1, g1), (k2, g2) = g.graphs["qformer"].items()
    assert g1.inputs[0] is g2.inputs[0] and g1.inputs[1] is not g2.inputs[1]
    other = model.encode_vision(frames_like(model, t, 10))
    torch.testing.assert_close(g.encode_video(other, questions[0]), model.encode_video(other, questions[0]),
                               rtol=0, atol=0)
    assert g.replays["qformer"] == 3
    # another frame count is another graph; returned outputs are copies, not the static buffer
    a = g.encode_vision(frames_like(model, t - 1, 0))
    b = g.encode_vision(frames_like(model, t - 1, 1))
    assert a.shape[0] == t - 1 and not torch.equal(a, b) and len(g.graphs["vision"]) == 2
    assert g.describe() == "cuda graphs: ViT 2 graph(s), Q-Former 2 graph(s)"


def test_shapes_past_the_limits_run_eagerly(model):
    t = model.config.num_frames
    g = EagerReplays(model)
    assert g.max_frames == 2 * t
    long = frames_like(model, 2 * t + 1, 0)
    for _ in range(2):
        torch.testing.assert_close(g.encode_vision(long), model.encode_vision(long), rtol=0, atol=0)
    assert g.graphs["vision"] == {} and g.captures == 0
    g = EagerReplays(model, max_vision=1, max_qformer=0)
    for n in (t, t - 1, t - 1):
        frames = frames_like(model, n, n)
        torch.testing.assert_close(g.encode_vision(frames), model.encode_vision(frames), rtol=0, atol=0)
    embeds = model.encode_vision(frames_like(model, t, 0))
    for _ in range(2):
        g.encode_video(embeds, "what is moving?")
    s = model.config.vision.image_size
    assert list(g.graphs["vision"]) == [((t, 3, s, s), torch.float32)]
    assert g.graphs["qformer"] == {} and g.replays == {"vision": 0, "qformer": 0}


def test_a_failed_capture_leaves_that_side_eager(model):
    class Failing(EagerReplays):
        def _capture(self, fn, inputs):
            if fn == self.model.encode_vision:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super()._capture(fn, inputs)

    g = Failing(model)
    frames = frames_like(model, model.config.num_frames, 0)
    with pytest.warns(RuntimeWarning, match="vision pass failed.*not permitted"):
        out = g.encode_vision(frames)
    torch.testing.assert_close(out, model.encode_vision(frames), rtol=0, atol=0)
    g.encode_vision(frames)  # no second try, no second warning
    assert g.graphs["vision"] == {} and "not permitted" in g.errors["vision"]
    g.encode_video(out, "what is moving?")
    assert len(g.graphs["qformer"]) == 1  # the other side still captures
    assert g.describe().startswith("cuda graphs: ViT eager (capture failed: RuntimeError")
