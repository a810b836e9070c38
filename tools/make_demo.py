"""Build the tiny demo model shipped in ``leangen/demo/``.

The demo is a 2-layer Llama (hidden size 64, GQA 4/2 heads) trained on CPU for
about a minute to count upward in English words ("one two three ... ninety
nine"), with its own small SentencePiece BPE tokenizer. It gives the tests and
the examples a real Hugging Face checkpoint whose greedy output is known:

    tokenizer.model     SentencePiece model, loadable by
                        torchtune.models.llama2.llama2_tokenizer
    config.json         transformers LlamaConfig
    model.safetensors   LlamaForCausalLM weights (float32)

Everything is seeded (random.Random(0), torch.manual_seed(0), one thread for
SentencePiece, two for torch), so reruns on the same machine give the same
files. The script ends by checking greedy continuations with transformers and
with torchtune's ``llama2`` builder (weights through ``hf_to_tune``) and exits
non-zero if either is wrong.

Run from the repository root:

    python tools/make_demo.py [--out leangen/demo]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import random
import sys
import time

import sentencepiece as spm
import torch
import transformers

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

ONES = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MAX_NUMBER = 99

# Model shape. The torchtune builder kwargs are derived from these in tune_kwargs().
VOCAB_SIZE = 96
DIM = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE = 192
MAX_SEQ_LEN = 256
NORM_EPS = 1e-5
ROPE_BASE = 10000.0
BOS_ID, EOS_ID = 1, 2

# Training.
SEQ_LEN = 176  # "one" .. "ninety nine" is 171 tokens, so every run reaches EOS
BATCH_SIZE = 16
STEPS = 1200
LR = 3e-3

PROMPTS = ["one two three", "thirty one thirty two thirty three"]
NEW_TOKENS = 20


def number_words(n: int) -> str:
    """English words for 1 <= n <= 99, e.g. 42 -> "forty two"."""
    if n < 20:
        return ONES[n - 1]
    tens, ones = divmod(n, 10)
    word = TENS[tens - 2]
    return word if ones == 0 else f"{word} {ONES[ones - 1]}"


def count_from(start: int, stop: int = MAX_NUMBER) -> str:
    return " ".join(number_words(n) for n in range(start, stop + 1))


def make_corpus(rng: random.Random, lines: int = 2000) -> list[str]:
    """Counting runs that start at random numbers and go upward for 6 to 41 numbers."""
    corpus = [count_from(1)]
    for _ in range(lines):
        start = rng.randint(1, MAX_NUMBER)
        corpus.append(count_from(start, min(MAX_NUMBER, start + rng.randint(5, 40))))
    return corpus


def train_tokenizer(corpus: list[str], out_model: pathlib.Path) -> spm.SentencePieceProcessor:
    """BPE over the corpus. The corpus goes in and the model comes out through memory, so no
    temporary path ends up in the model's trainer spec and reruns write identical bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        normalization_rule_name="identity",  # ASCII corpus; keeps the file at a few KB
        unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_model.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out_model))


def check_tokenizer(path: pathlib.Path) -> None:
    """The shipped tokenizer must load and round-trip through torchtune."""
    from torchtune.models.llama2 import llama2_tokenizer

    tok = llama2_tokenizer(str(path))
    text = "one two three"
    ids = tok.encode(text, add_bos=True, add_eos=False)
    if ids[0] != BOS_ID or tok.decode(ids) != text:
        raise SystemExit(f"tokenizer round trip failed: {ids} -> {tok.decode(ids)!r}")
    words = ONES + TENS
    multi = [w for w in words if len(tok.encode(w, add_bos=False, add_eos=False)) != 1]
    print(f"tokenizer: {len(words)} number words, {len(multi)} split into >1 piece")


def make_batch(sp: spm.SentencePieceProcessor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + counting from a random start (EOS after "ninety nine"), cut to SEQ_LEN + 1 tokens."""
    inputs, labels = [], []
    for _ in range(BATCH_SIZE):
        ids = [BOS_ID] + sp.encode(count_from(rng.randint(1, MAX_NUMBER))) + [EOS_ID]
        ids = ids[: SEQ_LEN + 1]
        pad = SEQ_LEN + 1 - len(ids)
        inputs.append(ids[:-1] + [EOS_ID] * pad)
        labels.append(ids[1:] + [-100] * pad)  # padding is ignored by the loss
    return torch.tensor(inputs), torch.tensor(labels)


def hf_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=DIM,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_SEQ_LEN,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )


def train_model(sp: spm.SentencePieceProcessor, rng: random.Random):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(sp.get_piece_size())).float()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    model.train()
    for step in range(1, STEPS + 1):
        inputs, labels = make_batch(sp, rng)
        logits = model(input_ids=inputs).logits  # labels are already shifted: no labels= here
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == STEPS:
            print(f"  step {step:5d}  loss {loss.item():.4f}")
    return model.eval()


def expected_ids(sp: spm.SentencePieceProcessor, prompt: str, n: int) -> list[int]:
    """The (at most n) tokens that follow `prompt` when counting on correctly, EOS included."""
    full = sp.encode(count_from(1)) + [EOS_ID]
    want = sp.encode(prompt)
    for i in range(len(full) - len(want) + 1):
        if full[i:i + len(want)] == want:
            return full[i + len(want): i + len(want) + n]
    raise ValueError(f"prompt {prompt!r} is not a counting run")


def tune_kwargs(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, num_layers=NUM_LAYERS, num_heads=NUM_HEADS,
                num_kv_heads=NUM_KV_HEADS, embed_dim=DIM, max_seq_len=MAX_SEQ_LEN,
                intermediate_dim=INTERMEDIATE, norm_eps=NORM_EPS, rope_base=ROPE_BASE)


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n,
                         pad_token_id=EOS_ID)
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def tune_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding without KV cache: re-run the whole sequence for every token."""
    tokens = torch.tensor([prompt_ids])
    new = []
    for _ in range(n):
        nxt = int(model(tokens)[:, -1].argmax(-1))
        new.append(nxt)
        if nxt == EOS_ID:
            break
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return new


def load_tune_model(out: pathlib.Path, vocab_size: int):
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama2 import llama2

    sd = hf_to_tune(load_file(str(out / "model.safetensors")),
                    num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, dim=DIM)
    model = llama2(**tune_kwargs(vocab_size))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def check(hf, tune, sp: spm.SentencePieceProcessor, prompt: str, n: int, show_ids: bool) -> bool:
    prompt_ids = [BOS_ID] + sp.encode(prompt)
    want = expected_ids(sp, prompt, n)
    got_hf, got_tune = hf_greedy(hf, prompt_ids, n), tune_greedy(tune, prompt_ids, n)
    good = got_hf == want and got_tune == want
    text = sp.decode(got_hf)
    shown = text if show_ids else "... " + " ".join(text.split()[-6:])
    print(f"{'OK  ' if good else 'FAIL'} {prompt!r} -> {shown!r} "
          f"({len(got_hf)} tokens, hf == torchtune: {got_hf == got_tune})")
    if show_ids or not good:
        print(f"     prompt ids {prompt_ids}\n     hf   ids {got_hf}\n     tune ids {got_tune}")
    if not good:
        print(f"     want ids {want} ({sp.decode(want)!r})")
    return good


def verify(out: pathlib.Path, sp: spm.SentencePieceProcessor) -> bool:
    """Greedy continuations from the saved files, through transformers and through torchtune."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out)).eval()
    tune = load_tune_model(out, sp.get_piece_size())
    ok = all([check(hf, tune, sp, p, NEW_TOKENS, show_ids=True) for p in PROMPTS])
    # The whole count, "two" .. "ninety nine" then EOS: every position the model was trained on.
    ok &= check(hf, tune, sp, "one", len(sp.encode(count_from(2))) + 1, show_ids=False)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "leangen" / "demo",
                        help="output folder (default: leangen/demo in the repo)")
    args = parser.parse_args(argv)
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    rng = random.Random(0)

    sp = train_tokenizer(make_corpus(rng), out / "tokenizer.model")
    check_tokenizer(out / "tokenizer.model")
    print(f"training {STEPS} steps, batch {BATCH_SIZE}x{SEQ_LEN}, vocab {sp.get_piece_size()}")
    model = train_model(sp, rng)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "model.safetensors").chmod(0o644)  # written 0600; package data must be world-readable

    ok = verify(out, sp)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s; "
          f"torchtune llama2(**{tune_kwargs(sp.get_piece_size())})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
