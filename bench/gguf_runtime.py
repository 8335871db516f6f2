"""Does llama.cpp itself run what `alignlab export --gguf` writes as transformers runs the merged model? Tokens and
greedy answers, side by side.

    pip install llama-cpp-python          # from source: PyPI has no wheel of it for Linux; CMake + a C++ compiler
    python bench/gguf_runtime.py          # ~2 minutes on 2 CPU cores; builtin:smollm2-135m-instruct
    python bench/gguf_runtime.py --model PATH/TO/EXPORTED/FOLDER --types f32,q8_0

The model (by default the built-in SmolLM2-135M-Instruct; or an exported folder) is written as GGUF files with
alignlab's writer (alignlab/export/gguf_writer.py), each loaded by llama.cpp (llama-cpp-python). For each prompt
of PROMPTS, with the chat template applied: do llama.cpp's token ids equal transformers' tokenizer's (the
pre-tokenizer and the special tokens), and how many of the first greedy tokens agree with transformers' greedy
decoding, of the float32 model and of the weights as the file stores them (f16, q8_0: rounded; llama.cpp's q8_0
kernels also round the activations to 8 bits, so a near tie can still go the other way). The tests check the same files through transformers' GGUF loader; this checks the runtime people use.
Nothing here is asserted: the table goes to bench/results/gguf_runtime.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table, versions, write_result  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 + 30? Answer with the number.",
    "Write one sentence about the sea.",
    "List the days of the week, separated by commas.",
]
NEW_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="builtin:NAME or a model folder")
    parser.add_argument("--types", default="f32,q8_0", help="GGUF types to write and run (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp from source)")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import resolve_model_name
    from alignlab.builtin.pretrained import PRETRAINED_MODELS, fetch_gguf
    from alignlab.export.gguf_writer import as_stored, write_gguf
    from alignlab.generation import end_token_ids
    from alignlab.gguf import read_gguf_header

    torch.set_num_threads(args.threads)
    folder = resolve_model_name(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ends = [i for i in dict.fromkeys(end_token_ids(tok, model)) if i is not None]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]  # fmt: skip
    hf_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]

    def greedy(m) -> list[list[int]]:
        answers = []
        for ids in hf_ids:
            with torch.no_grad():
                out = m.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=ends,
                                 pad_token_id=tok.pad_token_id, repetition_penalty=None)  # fmt: skip
            answers.append(out[0, len(ids) :].tolist())
        return answers

    hf_answers = greedy(model)

    pre = None  # a built-in converted from a GGUF: that GGUF's pre-tokenizer name, as `alignlab export` writes it
    name = args.model.removeprefix("builtin:")
    if args.model.startswith("builtin:") and name in PRETRAINED_MODELS:
        pre = read_gguf_header(fetch_gguf(name)).get("tokenizer.ggml.pre")

    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            path = Path(tmp) / f"model-{kind}.gguf"
            write_gguf(path, model.config, model.state_dict(), tok, ends, kind, name="bench", source_pre=pre)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, verbose=False)
            # transformers on the weights as the file stores them (f16, q8_0: rounded): what llama.cpp should compute
            stored = copy.deepcopy(model)
            stored.load_state_dict({k: as_stored(v, kind) for k, v in model.state_dict().items()})
            as_file = greedy(stored) if kind != "f32" else hf_answers
            del stored
            for prompt, text, ids, hf, same_weights in zip(PROMPTS, texts, hf_ids, hf_answers, as_file):
                cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
                start = time.perf_counter()
                cpp = []
                for token in llm.generate(cpp_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    cpp.append(token)  # as transformers' greedy output: up to and including an end token
                    if token in ends or len(cpp) == NEW_TOKENS:
                        break
                seconds = time.perf_counter() - start
                rows.append([kind, prompt[:32], cpp_ids == ids, _agree(hf, cpp), _agree(same_weights, cpp),
                             round(seconds, 2)])  # fmt: skip
                raw[f"{kind}: {prompt}"] = {"tokens_equal": cpp_ids == ids, "hf": hf, "hf_file_weights": same_weights,
                                            "llama_cpp": cpp, "hf_text": tok.decode(hf),
                                            "llama_cpp_text": tok.decode(cpp)}  # fmt: skip
            del llm
    headers = ["type", "prompt", "same token ids", "greedy tokens as float32 transformers",
               "as transformers on the file's weights", "llama.cpp s"]  # fmt: skip
    text = table(headers, rows)
    print(text)
    path = write_result("gguf_runtime", {
        "bench": "gguf_runtime", "model": args.model, "new_tokens": NEW_TOKENS, "machine": machine(),
        "versions": {**versions(), "llama_cpp_python": llama_cpp.__version__}, "table": text, "raw": raw,
    })  # fmt: skip
    print(f"wrote {path}")


def _agree(reference: list[int], got: list[int]) -> str:
    """`k/n`: the first k of the reference's n greedy tokens that llama.cpp gave too."""
    k = next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), min(len(reference), len(got)))
    return f"{k}/{len(reference)}"


if __name__ == "__main__":
    main()
