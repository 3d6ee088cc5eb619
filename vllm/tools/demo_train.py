"""Train the README demo: a tiny MoE model plus two LoRA adapters you can tell apart at a glance.

    python -m vllm.tools.demo_train --out demo/assets [--seed 0]

The task is plain completion (no chat template). A prompt is ``word: <w>\\n``
with ``<w>`` a lowercase English word of 3-9 letters; the model writes its
answer and then the end-of-text token:

    prompt            base      adapter "upper"   adapter "reverse"
    "word: hello\\n"   hello     HELLO             olleh

* Tokenizer: byte-level (every byte is one token, no merges) built with the
  ``tokenizers`` library, plus the special tokens ``<|endoftext|>`` (eos and
  pad), ``<|im_start|>`` and ``<|im_end|>``; saved as a PreTrainedTokenizerFast.
* Base model: a ``Qwen3MoeForCausalLM`` (4 layers, hidden 128, 8 routed
  experts, top-2) trained from scratch to copy the word.
* Adapters: real PEFT LoRA adapters (``get_peft_model``) on the attention
  projections *and* on the routed experts' 3D weights (``target_parameters``
  ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``), trained from the
  saved base with the base frozen.

A fixed list of common English words is embedded below; ~15% of them are held
out (never trained on) so the demo can show generalisation. Training also uses
random lowercase letter strings, which teaches the model to spell *any* word
rather than memorise the list. Loss is on the answer tokens and the EOS only.
Everything is seeded (and, with the default single CPU thread, bit-for-bit
reproducible) and runs on CPU in about 2.5 minutes; at the end the script
reloads the written files and prints greedy exact-match accuracy (HF
``generate``) on the held-out words.

Outputs: ``OUT/model/`` (checkpoint + tokenizer + generation_config),
``OUT/adapters/upper/``, ``OUT/adapters/reverse/`` and ``OUT/words.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from vllm.tools.make_tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS

PROMPT_FORMAT = "word: {word}\n"
EOS_TOKEN = "<|endoftext|>"
ADAPTERS = ("upper", "reverse")
HELD_OUT_FRACTION = 0.15

# Common English words, lowercase, 3-9 letters (the order does not matter:
# the split is drawn with a seeded shuffle).
_WORDS_TEXT = """
able about above accept across action active actor address adult advice afraid after
again against age agent agree ahead air allow almost alone along already also always
amount ancient anger angle animal answer anyone apple area argue arm army around arrive
art article artist ask attack author autumn avoid away baby back bad bag balance ball
band bank bar base basket battle beach bear beat beautiful because become bed before
begin behind believe bell belt benefit best better between bicycle big bird birthday
bit black blanket blood blue board boat body bone book border borrow bottle bottom box
boy brain branch brave bread break breakfast bridge bright bring brother brown brush
budget build burn bus business busy butter button buy cabin cake call calm camera camp
can candle capital captain car card care carpet carry case castle cat catch cause
ceiling center chair chalk chance change chapter charge cheap check cheese chicken
child choice church circle city claim class clean clear climb clock close cloud coast
coat coffee cold collect color come common cook cool copy corner cost cotton count
country courage course cousin cover cow crazy cream create crowd cry culture cup
current curtain customer cut daily damage dance danger dark daughter day dead deal
dear debate decide deep degree delay desert design desk detail develop diamond dinner
direction dirty discover dish doctor dog dollar door double doubt dream dress drink
drive drop dry duck dust duty eagle early earth east easy eat edge effect effort egg
eight either elbow eleven empty end enemy energy engine enjoy enough enter equal escape
evening event every exact example exercise expect explain eye face fact factory fail
fair fall family famous far farm fast father fault fear feather feel fence festival
few field fight figure fill film final find fine finger finish fire first fish five
flag flat floor flower fly focus follow food foot forest forget fork form forward four
free fresh friend frog front fruit full funny future game garden gate gather general
gentle gift girl give glass glove goal gold good grain grass gray great green ground
group grow guess guest guide guitar hair half hall hammer hand happy harbor hard hat
have head health hear heart heavy height hello help hero hidden high hill history
hold hole holiday home honest honey hope horse hospital hot hotel hour house human
humor hundred hungry hunt hurry husband ice idea image island jacket job join journey
joy judge juice jump jungle just keep kettle key kid kind king kitchen knee knife
knock know ladder lady lake lamp land language large last late laugh lawyer layer lazy
leader leaf learn leather leave left lemon lesson letter level library life light
like line lion list listen little live local lock long look lose loud love low lucky
lunch machine magic mail major make manager map market marriage master match matter
meal measure meat medicine meet member memory message metal middle milk mind minute
mirror miss model moment money monkey month moon morning mother motion mountain mouse
mouth move movie music name narrow nation nature near neck need needle neither nephew
nerve never new news next nice night nine noble noise north nose note nothing notice
number nurse object ocean offer office often oil old onion open opinion orange order
other outside oven owner page pain paint pair palace paper parent park part party pass
past path pattern peace pencil people pepper perfect person piano picture piece pilot
pink place plane planet plant plate play pocket poem point police pool poor popular
potato power present pretty price prince print prison private problem promise proud
public pull purple push queen question quick quiet rabbit race radio rain raise
reach read ready reason record red remember repeat report rest result rice rich
ride right ring river road rock roof room root rope rose round rule run sad safe
salt same sand save say school science score sea season seat second secret see sell
send sense serve seven shadow shape share sharp sheep shelf shell ship shirt shoe
short shoulder show sign silver simple sing sister sit six size skill skin sky sleep
slow small smell smile smoke snake snow soap soft soldier son song sound soup south
space speak special speed spend spoon spring square stage star start station stay
steel step stick stone stop store storm story street strong student study sugar
summer sun supper sure sweet swim table tail take talk tall taste teacher team tell
ten tent test thank thick thin thing think thread three throat thunder ticket tiger
time tired today together tomorrow tongue tool tooth top touch towel tower town toy
train travel tree trouble truck true trust truth turn twelve twenty two uncle under
until upper useful valley value village violin visit voice wait walk wall want warm
wash watch water wave way weather wedding week weight welcome west wheel white whole
wide wife wild win wind window winter wise wish woman wonder wood word work world
worry write yard year yellow yesterday young zebra
"""
WORDS: list[str] = sorted(set(_WORDS_TEXT.split()))


def _split_words(seed: int = 0) -> tuple[list[str], list[str]]:
    words = list(WORDS)
    random.Random(1234 + seed).shuffle(words)
    n_held = round(len(words) * HELD_OUT_FRACTION)
    return sorted(words[n_held:]), sorted(words[:n_held])


TRAIN_WORDS, HELD_OUT_WORDS = _split_words(0)


def make_prompt(word: str) -> str:
    """The completion prompt for ``word``: ``'word: hello\\n'``."""
    return PROMPT_FORMAT.format(word=word)


def expected_answer(word: str, adapter: str | None = None) -> str:
    """What greedy decoding should produce (before EOS): adapter None/"base" copies,
    "upper" upper-cases, "reverse" reverses."""
    if adapter in (None, "base"):
        return word
    if adapter == "upper":
        return word.upper()
    if adapter == "reverse":
        return word[::-1]
    raise ValueError(f"unknown adapter {adapter!r}; choose from base, {', '.join(ADAPTERS)}")


def held_out_words(assets_dir: str | None = None) -> list[str]:
    """The held-out words (from ``assets_dir/words.json`` when given, else the seed-0 split)."""
    if assets_dir is None:
        return list(HELD_OUT_WORDS)
    with open(os.path.join(assets_dir, "words.json")) as f:
        return list(json.load(f)["held_out"])


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer():
    """Byte-level tokenizer: ids 0-2 are the special tokens, id 3 + b is byte b; no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(SPECIAL_TOKENS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False, model_max_length=128,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------- model

def demo_config(vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, intermediate_size=256, norm_topk_prob=True,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        tie_word_embeddings=False)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


LORA_RANK = 16
LORA_ALPHA = 32
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# steps, batch size, peak learning rate
BASE_SCHEDULE = (350, 64, 3e-3)
ADAPTER_SCHEDULES = {"upper": (150, 64, 5e-3), "reverse": (250, 64, 5e-3)}


# ----------------------------------------------------------------------------- data

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class _Batches:
    """A fixed, seeded stream of training examples: half words from the training
    split, half random lowercase strings of 3-9 letters. For the base model a
    quarter of them are upper-cased (copying works for any letters), so the
    upper-case tokens get trained embeddings the "upper" adapter can aim at."""

    def __init__(self, tokenizer, train_words: list[str], adapter: str | None, seed: int):
        self.tok = tokenizer
        self.words = train_words
        self.adapter = adapter
        self.rng = random.Random(seed)
        self.eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def _word(self) -> str:
        if self.rng.random() < 0.5:
            w = self.rng.choice(self.words)
        else:
            w = "".join(self.rng.choice(_LETTERS) for _ in range(self.rng.randint(3, 9)))
        if self.adapter is None and self.rng.random() < 0.25:
            w = w.upper()
        return w

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, labels = [], []
        for _ in range(batch_size):
            w = self._word()
            prompt = self.tok.encode(make_prompt(w), add_special_tokens=False)
            answer = self.tok.encode(expected_answer(w, self.adapter), add_special_tokens=False)
            answer.append(self.eos)
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        n = max(len(s) for s in seqs)
        # right padding needs no attention mask under causal attention;
        # padded positions carry no loss
        ids = torch.tensor([s + [self.eos] * (n - len(s)) for s in seqs])
        lab = torch.tensor([l + [-100] * (n - len(l)) for l in labels])
        return ids, lab


def _train(model, params, batches: _Batches, schedule, log_name: str) -> None:
    steps, batch_size, lr = schedule
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    model.train()
    flush = torch.set_flush_denormal(True)  # tiny late-training values are slow on CPU otherwise
    t0 = time.time()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        ids, labels = batches.next(batch_size)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{log_name}] step {step:4d}/{steps}  loss {loss.item():.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    if flush:
        torch.set_flush_denormal(False)
    model.eval()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def greedy_answers(model, tokenizer, words: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy HF ``generate`` for each word (batched by word length, so no padding)."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    out: dict[str, str] = {}
    by_len: dict[int, list[str]] = {}
    for w in words:
        by_len.setdefault(len(w), []).append(w)
    for group in by_len.values():
        ids = torch.tensor([tokenizer.encode(make_prompt(w), add_special_tokens=False)
                            for w in group])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
        for w, row in zip(group, gen[:, ids.shape[1]:].tolist()):
            if eos in row:
                row = row[:row.index(eos)]
            out[w] = tokenizer.decode(row)
    return [out[w] for w in words]


def evaluate(out_dir: str, words: list[str]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Exact-match accuracy and the answers of base and each adapter, loading
    everything from ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = os.path.join(out_dir, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    acc, answers = {}, {}
    for name in ("base",) + ADAPTERS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if name != "base":
            model = PeftModel.from_pretrained(model, os.path.join(out_dir, "adapters", name)).eval()
        answers[name] = greedy_answers(model, tokenizer, words)
        acc[name] = sum(a == expected_answer(w, name)
                        for w, a in zip(words, answers[name])) / len(words)
    return acc, answers


# ----------------------------------------------------------------------------- main

def _tidy_adapter_dir(adapter_dir: str) -> None:
    """Drop PEFT's empty model-card template and sort ``target_modules`` (PEFT writes a
    set in hash order), so reruns produce byte-identical files."""
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def train_all(out_dir: str, seed: int = 0, dtype: str = "bfloat16",
              threads: int = 1) -> dict[str, dict[str, float]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(threads)
    t_start = time.time()
    train_words, held_out = _split_words(seed)
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(out_dir, "words.json"), "w") as f:
        json.dump({"prompt_format": PROMPT_FORMAT, "seed": seed, "train": train_words,
                   "held_out": held_out}, f, indent=1)
        f.write("\n")

    tokenizer = build_byte_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    # 1. base model: copy
    print(f"base model ({len(train_words)} training words, {len(held_out)} held out)", flush=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(demo_config(len(tokenizer), eos_id),
                                             dtype=torch.float32)
    _train(model, list(model.parameters()), _Batches(tokenizer, train_words, None, seed),
           BASE_SCHEDULE, "base")
    model.to(getattr(torch, dtype)).save_pretrained(model_dir)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                     do_sample=False).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    t_base = time.time() - t_start

    # 2. adapters, each from the saved base (so they see exactly the shipped weights)
    times = {"base": t_base}
    for k, name in enumerate(ADAPTERS):
        t0 = time.time()
        print(f"adapter {name!r}", flush=True)
        torch.manual_seed(seed + 1 + k)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                            target_modules=list(LORA_TARGET_MODULES),
                            target_parameters=list(LORA_TARGET_PARAMETERS),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        _train(peft_model, params, _Batches(tokenizer, train_words, name, seed + 1 + k),
               ADAPTER_SCHEDULES[name], name)
        adapter_dir = os.path.join(out_dir, "adapters", name)
        peft_model.save_pretrained(adapter_dir)
        _tidy_adapter_dir(adapter_dir)
        times[name] = time.time() - t0
    t_train = time.time() - t_start

    # 3. evaluate from the files on disk
    t0 = time.time()
    acc_held, answers = evaluate(out_dir, held_out)
    rng = random.Random(seed)
    train_sample = sorted(rng.sample(train_words, min(len(held_out), len(train_words))))
    acc_train, _ = evaluate(out_dir, train_sample)
    t_eval = time.time() - t0
    print()
    print(f"greedy exact match (HF generate), {len(held_out)} held-out / "
          f"{len(train_sample)} training words")
    print(f"{'model':<10}{'answer':<12}{'held-out':>10}{'train':>10}{'train time':>12}")
    for name in ("base",) + ADAPTERS:
        example = expected_answer("hello", name)
        print(f"{name:<10}{example:<12}{acc_held[name]:>10.1%}{acc_train[name]:>10.1%}"
              f"{times[name]:>11.0f}s")
    print("\nheld-out examples:")
    for i in range(0, len(held_out), max(1, len(held_out) // 5))[:5]:
        print(f"  {make_prompt(held_out[i])!r:<22}" +
              "  ".join(f"{name}: {answers[name][i]:<10}" for name in ("base",) + ADAPTERS))
    print(f"training {t_train:.0f}s, evaluation {t_eval:.0f}s, output in {out_dir}")
    return {"held_out": acc_held, "train": acc_train}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the saved base weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is the robust choice on a shared machine: "
                             "with 2 threads a busy neighbour makes each step many times slower)")
    args = parser.parse_args(argv)
    train_all(args.out, args.seed, args.dtype, args.threads)


if __name__ == "__main__":
    main()
