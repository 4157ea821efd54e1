"""Command line: ``stllm answer ...`` (one question about one video), ``stllm serve ...`` (HTTP) and
``stllm run-batch ...`` (a file of requests in OpenAI's batch format, see :mod:`stllm_engine.batch`).

``python -m stllm_engine.cli``, ``python -m stllm_engine`` and the ``stllm`` console script are the
same. Answers go to stdout (``--json``: answer + timings as JSON); progress, notices and a short
timing summary go to stderr. Bad input (missing video, bad parameters, bad checkpoint) prints one
line ``stllm: error: ...`` and exits with code 2; other failures exit with 1, also one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE, EXIT_FAILURE = 2, 1
DTYPES = ("auto", "float32", "float16", "bfloat16")
SAMPLING_FLAGS = ("num_beams", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                  "logprobs", "choices")
DEFAULT_QUESTION = "What happens in the video?"


class CLIError(Exception):
    """An error reported as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise CLIError(f"{message} (see {self.prog} --help)")


def one_line(msg: object, limit: int = 400) -> str:
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder in the official layout (default: the default model)")
    p.add_argument("--qformer-tokenizer", default=None,
                   help="Q-Former BERT tokenizer folder or vocab.txt, for release checkpoints that lack "
                        "qformer_tokenizer/ (bert-base-uncased)")
    p.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:1 (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype; auto = float32 on CPU, float16 on CUDA")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: launch the decode, prefill, ViT and Q-Former passes kernel by kernel "
                        "instead of replaying CUDA graphs")
    p.add_argument("--kv-cache-mib", type=int, default=None,
                   help="KV cache size in MiB (default: on the CPU room for 4 max-length sequences within a "
                        "quarter of the available memory, at least 256; on a GPU the free memory less 8 GiB, at least "
                        "half of it, at most 4 x --max-num-seqs max-length sequences)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + new tokens cap (default: the release's 2000, bounded by the model's positions); "
                        "a longer prompt is cut from the left, video tokens first, as the release cuts it")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up requests at load (answer, run-batch: on CUDA; serve: always), so the first "
                        "request pays the Triton compiles and library set-up instead")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="stllm", description="ST-LLM video question answering: answer, serve or run a batch file.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("answer", help="answer one question about one video")
    a.add_argument("--video", help="video file, GIF, image or folder of frames (default: the sample video)")
    a.add_argument("--question", default=None,
                   help=f"default: the shipped sample's question for the sample video, else {DEFAULT_QUESTION!r}")
    a.add_argument("--system", default=None, help="system prompt (default: the release's chat system)")
    _add_model_args(a)
    a.add_argument("--backend", default="engine", choices=("engine", "reference"),
                   help="engine (fast) or reference (transformers baseline)")
    g = a.add_argument_group("sampling (defaults: the release's chat, greedy, repetition penalty 1.5)")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="engine only")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--logprobs", type=int, help="with --json: each token's log-probability and this many "
                                                "alternatives (0-20; engine only)")
    g.add_argument("--choice", dest="choices", action="append", metavar="TEXT",
                   help="the answer is exactly one of the --choice texts (repeat the flag; engine only)")
    a.add_argument("--num-frames", type=int, help="frames sampled (default: the model's)")
    a.add_argument("--keep-ratio", type=float, default=1.0, help="share of video tokens kept (engine only)")
    a.add_argument("--stream", action="store_true", help="print the answer as it is generated (engine only)")
    a.add_argument("--json", action="store_true", help="print the answer and timings as one JSON object")
    a.add_argument("--no-progress", action="store_true",
                   help="print no progress lines on stderr while a long request runs (video, prefill, generation)")
    s = sub.add_parser("serve", help="HTTP server: GET /health, GET /metrics (Prometheus), POST /v1/answer, "
                                      "and OpenAI-compatible GET /v1/models, POST /v1/chat/completions")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch (default 64)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id of /v1/models and chat completions (default: the --model folder as given)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, seconds the requests in flight get to finish before they are "
                        "aborted (default 30; a second signal stops at once)")
    b = sub.add_parser("run-batch", help="answer a JSONL file of requests in OpenAI's batch format "
                                         "(/v1/chat/completions or /v1/answer bodies), continuously batched")
    _add_model_args(b)
    b.add_argument("-i", "--input", required=True, help="JSONL file of requests, or - for stdin")
    b.add_argument("-o", "--output", required=True, help="JSONL file of results (input order), or - for stdout")
    b.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch (default 64)")
    b.add_argument("--window", type=int, default=None,
                   help="most lines in flight (default: 2 x --max-num-seqs); bounds memory on long files")
    b.add_argument("--served-model-name", default=None, help="the model id in chat results (default: the folder)")
    b.add_argument("--no-progress", action="store_true", help="print no progress lines on stderr")
    return ap


# --- shared pieces ----------------------------------------------------------------------------
def resolve_model(model: str | None) -> Path:
    """The checkpoint folder; the default model prints a notice when it is untrained."""
    if model is None:
        from stllm_engine.default_model import default_model

        dm = default_model()
        if not dm.trained:
            progress(f"stllm: notice: the default model ({dm.path}) is an UNTRAINED tiny checkpoint; "
                     "its answers are noise. Pass --model FOLDER for a real one.")
        return dm.path
    path = Path(model)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {model}")
    if not (path / "config.json").is_file():
        raise CLIError(f"not a checkpoint folder (no config.json): {model}")
    return path


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def check_device(device: str) -> str:
    """The device to use (``auto`` resolved); CLIError when it is unusable."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CLIError(f"bad --device {device!r}: {one_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} requested but CUDA is not available")
    return device


def engine_sizes(args) -> dict:
    """EngineConfig fields from --kv-cache-mib / --max-length (CLIError on a bad value)."""
    out = {}
    for flag, name, key, scale in (("--kv-cache-mib", "kv_cache_mib", "kv_cache_memory", 1 << 20),
                                   ("--max-length", "max_length", "max_length", 1)):
        v = getattr(args, name, None)
        if v is not None:
            if v < 1:
                raise CLIError(f"bad {flag}: {v} (must be a positive int)")
            out[key] = v * scale
    return out


def load_engine(folder: Path, device: str, dtype, **kw):
    from stllm_engine.api import STLLM

    progress(f"loading {folder} on {device} ({str(dtype).removeprefix('torch.')}) ...")
    t = time.perf_counter()
    try:
        llm = STLLM.from_pretrained(folder, device=device, dtype=dtype, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CLIError(f"cannot load model {folder}: {one_line(e)}") from None
    warm = llm.engine.warmup_s
    progress(f"loaded in {time.perf_counter() - t:.1f}s" + (f" (warm-up {warm:.1f}s)" if warm is not None else ""))
    return llm


# --- answer -----------------------------------------------------------------------------------
def _sampling_kw(args) -> dict:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}


def _check_answer_args(args) -> None:
    from stllm_engine.sampling_params import SamplingParams

    from stllm_engine.video.sources import path_problem

    problem = None if args.video is None else path_problem(args.video)
    if problem:
        raise CLIError(problem)
    if args.question is not None and not args.question.strip():
        raise CLIError("--question is empty")  # as the HTTP endpoints refuse it
    if args.num_frames is not None and args.num_frames < 1:
        raise CLIError(f"--num-frames must be a positive int, got {args.num_frames}")
    if not 0 < args.keep_ratio <= 1:
        raise CLIError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    try:
        SamplingParams(**_sampling_kw(args))
    except ValueError as e:
        flag = str(e).split(" ")[0].removeprefix("SamplingParams.").replace("_", "-")
        flag = "choice" if flag == "choices" else flag
        raise CLIError(f"bad sampling flag --{flag}: {e}" if flag in
                       {f.replace("_", "-") for f in SAMPLING_FLAGS} | {"choice"} else f"bad sampling flags: {e}") from None
    engine_sizes(args)
    if args.backend == "reference":
        for flag, bad in (("--top-k", args.top_k is not None), ("--logprobs", args.logprobs is not None),
                          ("--choice", args.choices is not None),
                          ("--keep-ratio", args.keep_ratio != 1.0),
                          ("--stream", args.stream), ("--kv-cache-mib", args.kv_cache_mib is not None),
                          ("--max-length", args.max_length is not None)):
            if bad:
                raise CLIError(f"{flag} is not supported by --backend reference")
    if args.stream and (args.num_beams or 1) > 1:
        raise CLIError("--stream does not support beam search (--num-beams > 1)")
    if args.logprobs is not None and not args.json:
        raise CLIError("--logprobs needs --json (they are printed in the JSON object)")


def answer_engine(args, folder: Path, video) -> dict:
    from stllm_engine.answer_text import AnswerText, result_json
    from stllm_engine.cli_progress import ProgressLine
    from stllm_engine.outputs import MODEL_FAILURE

    llm = load_engine(folder, args.device, resolve_dtype(args.dtype, args.device),
                      qformer_tokenizer=args.qformer_tokenizer, enforce_eager=args.enforce_eager,
                      warmup=False if args.no_warmup else None, **engine_sizes(args))
    try:
        params = llm.params(**_sampling_kw(args))
    except (TypeError, ValueError) as e:
        raise CLIError(f"bad sampling flags: {one_line(e)}") from None
    opts = {k: v for k, v in (("system", args.system), ("num_frames", args.num_frames),
                              ("keep_ratio", args.keep_ratio)) if v is not None}
    eng = llm.engine
    streamer = AnswerText(llm.tokenizer, params.stop) if args.stream and not args.json else None
    shown = None if args.no_progress else ProgressLine(decode=streamer is None)
    ids: list[str] = []  # the request's id once add_request (which may decode and encode the video) returns
    if shown is not None:  # also while a long call runs: the video's decode and ViT, a prefill chunk
        shown.watch(lambda: eng.progress(ids[0]) if ids else {"phase": "video"})
    out = None
    try:
        ids.append(eng.add_request(video, args.question, params, **opts))
        rid = ids[0]
        while out is None:
            if not eng.has_unfinished_requests():
                raise CLIError("the engine went idle before the answer finished", EXIT_FAILURE)
            for o in eng.step():
                if o.request_id != rid:
                    continue
                if o.error is not None:
                    bad_input = not o.error.startswith(MODEL_FAILURE)
                    raise CLIError(one_line(o.error), EXIT_USAGE if bad_input else EXIT_FAILURE)
                if streamer is not None:
                    piece = streamer.piece(o.token_ids, final=o.finished, stop_reason=o.stop_reason)
                    if piece and shown is not None:
                        shown.close()
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if o.finished:
                    out = o
            if shown is not None and out is None:
                shown.update(eng.progress(rid))
    finally:
        if shown is not None:
            shown.close()
    res = result_json(llm, out)
    if streamer is not None:
        sys.stdout.write("\n")
    if out.num_truncated_prompt_tokens:
        n = out.num_truncated_prompt_tokens
        progress(f"stllm: notice: the prompt was cut from the left by {n} of {n + out.num_prompt_tokens} positions "
                 f"(video tokens first), as the release cuts prompt + max new tokens to max length "
                 f"{eng.max_length}; pass --max-length (and fewer --max-new-tokens) to keep the whole video")
    return res


def _reference_run(ref, video, args, kw: dict):
    """The reference's ``generate_ids`` step by step, timed: (5 time stamps, ReferenceGeneration)."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        frames = ref.load_frames(video, args.num_frames)
        t1 = time.perf_counter()
        feats = ref.encode_vision(frames)
        t2 = time.perf_counter()
        tokens = ref.projector(ref.frame_tokens(feats, args.question))
        t3 = time.perf_counter()
        gen = ref.generate_from_embeds(ref.chat_inputs_embeds(tokens, args.question, args.system), **kw)
    return (t0, t1, t2, t3, time.perf_counter()), gen


def answer_reference(args, folder: Path, video) -> dict:
    from stllm_engine.reference import ReferenceSTLLM

    progress(f"loading {folder} (reference) ...")
    t = time.perf_counter()
    try:
        ref = ReferenceSTLLM.from_pretrained(folder, dtype=resolve_dtype(args.dtype, args.device),
                                             device=args.device, qformer_tokenizer=args.qformer_tokenizer)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CLIError(f"cannot load model {folder}: {one_line(e)}") from None
    progress(f"loaded in {time.perf_counter() - t:.1f}s")
    kw = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p,
          "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.temperature:
        kw.update(do_sample=True, temperature=args.temperature)
    try:
        stamps, gen = _reference_run(ref, video, args, kw)
    except ValueError as e:
        raise CLIError(one_line(e)) from None
    t0, t1, t2, t3, t4 = stamps
    n, max_new = len(gen.token_ids), kw.get("max_new_tokens", 300)
    return {"text": ref.decode_answer(gen.token_ids), "finish_reason": "length" if n >= max_new else "stop",
            "timings": {"frame_decode": t1 - t0, "vision": t2 - t1, "qformer": t3 - t2, "generate": t4 - t3,
                        "total": t4 - t0, "num_tokens": n},
            "usage": {"prompt_tokens": gen.prompt_length, "completion_tokens": n}}


def timing_summary(res: dict) -> str:
    t = res["timings"]
    parts = [f"{name} {t[key]:.2f}s" for name, key in (
        ("frames", "frame_decode"), ("vision", "vision"), ("q-former", "qformer"), ("prefill", "prefill"),
        ("ttft", "ttft"), ("generate", "generate")) if key in t]
    if "decode_tokens_per_s" in t:
        parts.append(f"decode {t['num_decode_tokens']} tok @ {t['decode_tokens_per_s']:.1f} tok/s")
    if t.get("vision_cache_hit"):
        parts.append("vision cache hit")
    parts.append(f"total {t['total']:.2f}s")
    return "timings: " + " | ".join(parts) + f" | finish: {res['finish_reason']}"


def cmd_answer(args) -> int:
    _check_answer_args(args)
    folder = resolve_model(args.model)
    args.device = check_device(args.device)
    if args.video is None:
        from stllm_engine.default_model import sample_video

        args.video = str(sample_video())
        if args.question is None:
            from stllm_engine.default_model import sample_question

            args.question = (sample_question() or {}).get("question")
    if args.question is None:
        args.question = DEFAULT_QUESTION
    run = answer_engine if args.backend == "engine" else answer_reference
    res = run(args, folder, args.video)
    res.update(backend=args.backend, model=str(folder), video=args.video, question=args.question)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        if not args.stream:
            print(res["text"])
        progress(timing_summary(res))
    return 0


# --- serve ------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import asyncio

    from stllm_engine.server import serve

    sizes = engine_sizes(args)
    if not args.shutdown_timeout >= 0:
        raise CLIError(f"bad --shutdown-timeout: {args.shutdown_timeout} (seconds, >= 0)")
    for name in ("port", "max_num_seqs"):
        v = getattr(args, name)
        if v is not None and (v < (0 if name == "port" else 1) or (name == "port" and v > 65535)):
            raise CLIError(f"bad --{name.replace('_', '-')}: {v}")
    folder = resolve_model(args.model)
    args.device = check_device(args.device)
    llm = load_engine(folder, args.device, resolve_dtype(args.dtype, args.device),
                      max_num_seqs=args.max_num_seqs, **sizes,
                      qformer_tokenizer=args.qformer_tokenizer, enforce_eager=args.enforce_eager,
                      warmup=not args.no_warmup)

    def ready(server) -> None:
        progress(f"serving {folder} as model {server.served_model!r} on http://{server.host}:{server.port} "
                 "(GET /health, GET /metrics, GET /v1/models, POST /v1/answer, POST /v1/chat/completions); "
                 "Ctrl-C stops")

    try:
        asyncio.run(serve(llm, args.host, args.port, model_name=args.served_model_name or str(folder), ready=ready,
                          stop_signals=True, shutdown_timeout=args.shutdown_timeout, report=progress))
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {one_line(e)}", EXIT_FAILURE) from None
    except KeyboardInterrupt:
        progress("stopped at once")
    return 0


# --- run-batch --------------------------------------------------------------------------------
def cmd_run_batch(args) -> int:
    from contextlib import ExitStack

    from stllm_engine.batch import run_batch_file

    sizes = engine_sizes(args)
    window = args.window if args.window is not None else 2 * args.max_num_seqs
    if args.max_num_seqs < 1 or window < 1:
        raise CLIError(f"bad --max-num-seqs / --window: {args.max_num_seqs} / {window}")
    with ExitStack() as stack:
        # input lines that are not UTF-8 fail alone in their result line (batch._parse)
        try:
            if args.input == "-":
                sys.stdin.reconfigure(errors="surrogateescape")
                src = sys.stdin
            else:
                src = stack.enter_context(open(args.input, encoding="utf-8", errors="surrogateescape"))
        except OSError as e:
            raise CLIError(f"cannot open {e.filename}: {e.strerror}") from None
        check_output_path(args.output, args.input)  # before the load; truncated only after it
        folder = resolve_model(args.model)
        args.device = check_device(args.device)
        llm = load_engine(folder, args.device, resolve_dtype(args.dtype, args.device),
                          max_num_seqs=args.max_num_seqs, **sizes, qformer_tokenizer=args.qformer_tokenizer,
                          enforce_eager=args.enforce_eager, warmup=False if args.no_warmup else None)
        try:
            dst = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        except OSError as e:
            raise CLIError(f"cannot open {e.filename}: {e.strerror}") from None
        run_batch_file(llm, src, dst, args.served_model_name or str(folder), window,
                       None if args.no_progress else progress)
    return 0


def check_output_path(output: str, input_: str) -> None:
    """The result file can be written and is not the input (opening it for writing would empty
    the input before a line is read)."""
    if output == "-":
        return
    out = os.path.abspath(output)
    if input_ != "-" and os.path.exists(out) and os.path.samefile(out, input_):
        raise CLIError(f"the output file {output} is the input file; write the results elsewhere")
    if os.path.isdir(out):
        raise CLIError(f"cannot open {output}: Is a directory")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise CLIError(f"cannot open {output}: No such file or directory")
    if not os.access(out if os.path.exists(out) else folder, os.W_OK):
        raise CLIError(f"cannot open {output}: Permission denied")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    try:
        args = build_parser().parse_args(argv)
        return {"answer": cmd_answer, "serve": cmd_serve, "run-batch": cmd_run_batch}[args.command](args)
    except CLIError as e:
        print(f"stllm: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("stllm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, no traceback (set STLLM_DEBUG=1 for one)
        import os

        if os.environ.get("STLLM_DEBUG"):
            raise
        print(f"stllm: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
