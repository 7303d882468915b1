#!/usr/bin/env python3
"""Generate the tokenizer test fixtures: tokenizer files, test corpus and expected encodings from `tokenizers`.

Run (from the repository root; needs the Python `tokenizers` package, see tools/requirements.txt, and the `brotli`
command-line tool, Debian package `brotli`):

    python3 tools/gen_tokenizer_vectors.py [--data /work/shared/data] [--out tests/fixtures/tokenizers]

It is deterministic: the same inputs and `tokenizers` version give byte-identical outputs. The tests
(tests/test_tokenizer.cpp) never run Python; they read what this script writes:

  files/<name>.json.br         the real tokenizer.json of each model, brotli-compressed (byte-exact upstream files;
                               the ones already compressed in the data folder are copied as they are)
  files/mixtral-8x7b-v0.1.tokenizer_config.json   for the BOS/EOS lookup test
  corpus.bin.br                the test strings: hand-made edge cases, seeded random "fuzz" strings, every distinct
                               CounterFact string (prompt formatted with its subject, subject, " "+targets,
                               paraphrase / neighborhood / attribute / generation prompts), and every line of
                               WikiText-2 test (split on "\\n" of the raw bytes, so lines keep their "\\r"; joining
                               them with "\\n" gives back the whole 1.29 MB file)
  <name>.vec.br                what tokenizers.Tokenizer.encode / decode return for each corpus string
  variants.json, <variant>.vec.br   synthetic tokenizers (a real file with some components replaced, to cover
                               options no real file uses) and their expected encodings on the first strings
  manifest.json                names, sources, sha256, licenses, string counts, whole-file encoding digests

Formats (all integers are LEB128 varints unless said otherwise):
  corpus.bin   "MTC1", n, then n times: category (0 edge, 1 fuzz, 2 counterfact, 3 wikitext), byte length, UTF-8
  <x>.vec      "MTV1", n (the first n corpus strings), then per string:
                 ntok, then for WikiText lines fnv1a64(ids, offsets) as 8 bytes little-endian (a digest keeps
                 the fixtures small; each line is still checked on its own), for all other strings the ntok ids
                 and ntok times (zigzag(start - previous end), end - start)   [char offsets]
                 k_pre, k_post: template tokens at the start / end (encode(add_special_tokens=False) == the rest)
                 flags: 1 pieces == id_to_token(ids), 2 decode(ids) == text, 4 decode(ids, skip_special) == text,
                        8 decode(ids, skip_special) == decode(ids)
                 pieces (ntok times length + bytes) unless flag 1; decode unless flag 2; skip-special decode
                 unless flag 4 or 8. A decode string is stored as a diff against the text: the length of their
                 common suffix, then the rest of the decode (length + bytes) — "<s> " + text costs 5 bytes.
               and for the real tokenizers a trailer: the whole WikiText-2 file encoded as ONE string:
                 ntok, fnv1a64(ids, offsets) as 8 bytes little-endian, fnv1a64(decode) as 8 bytes, flags (2 as above)
  fnv1a64 runs over, per token, id, start, end as 32-bit little-endian words.
"""
import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import tokenizers
from tokenizers import Tokenizer

# name, source file (relative to <data>/tokenizers), license, origin
TOKENIZERS = [
    ("gpt2", "gpt2/tokenizer.json", "MIT", "openai-community/gpt2"),
    ("mixtral-8x7b-v0.1", "mixtral-8x7b-v0.1/tokenizer.json", "Apache-2.0", "mistralai/Mixtral-8x7B-v0.1"),
    ("mistral-7b-v0.1", "compressed/mistralai__Mistral-7B-v0.1__tokenizer.json.br", "Apache-2.0",
     "mistralai/Mistral-7B-v0.1 (via github.com/1cyberlangke1/tokkit)"),
    ("olmoe-1b-7b-0924", "olmoe-1b-7b-0924/tokenizer.json", "Apache-2.0", "allenai/OLMoE-1B-7B-0924"),
    ("olmoe-1b-7b-0125", "compressed/allenai__OLMoE-1B-7B-0125__tokenizer.json.br", "Apache-2.0",
     "allenai/OLMoE-1B-7B-0125 (via tokkit)"),
    ("qwen2-0.5b", "compressed/Qwen__Qwen2-0.5B__tokenizer.json.br", "Apache-2.0", "Qwen/Qwen2-0.5B (via tokkit)"),
    ("qwen3-0.6b", "compressed/Qwen__Qwen3-0.6B__tokenizer.json.br", "Apache-2.0", "Qwen/Qwen3-0.6B (via tokkit)"),
    ("deepseek-r1", "compressed/deepseek-ai__DeepSeek-R1__tokenizer.json.br", "MIT", "deepseek-ai/DeepSeek-R1 (via tokkit)"),
    ("gigachat-20b-a3b-base", "compressed/ai-sage__GigaChat-20B-A3B-base__tokenizer.json.br", "MIT",
     "ai-sage/GigaChat-20B-A3B-base (via tokkit)"),
    ("granite-3.0-2b-instruct", "compressed/ibm-granite__granite-3.0-2b-instruct__tokenizer.json.br", "Apache-2.0",
     "ibm-granite/granite-3.0-2b-instruct (via tokkit)"),
]

EDGE = [
    "", "Hello world", " leading space", "trailing space ", "  two leading", "many     spaces   here  ",
    "tab\tseparated\t\tvalues\t", "line1\nline2\n\nline4\n", "crlf\r\nline\r\n", "\r\n\r\n", "\n\n\n", "   ", "\t", " ",
    "\r", "a\rb", "digits 12345 6789012 3.14159 1,000,000", "0", "2024-01-01T12:34:56Z", "1234567890123456789",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵", "CJK 中文字符测试，日本語のテキスト、한국어 텍스트",
    "Кириллица: Привет, мир! Москва — столица России.", "Arabic: مرحبا بالعالم", "Hebrew שלום עולם",
    "Hindi नमस्ते दुनिया", "Thai สวัสดีชาวโลก",
    # combining sequences NFC composes (and some it reorders or leaves alone)
    "Cafe\u0301 re\u0301sume\u0301 nai\u0308ve", "e\u0301", "A\u030A", "\u1100\u1161\u11A8", "\u2126 Ohm", "q\u0307\u0323",
    "\u1E0B\u0323", "a\u0328\u0301", "\u0301abc", "x\u0301\u0301\u0301", "\uAC00\u11A8", "\u0915\u093C", "\u00C5\u0301",
    "Zoe\u0308 Bjo\u0308rk Dvor\u030Ca\u0301k", "\u212B ngstrom",
    # contractions
    "I'm you're we've they'll she'd it's DON'T I'LL HE'S 'S 'll 'Re", "rock 'n' roll", "''quoted''", "Paris's",
    # special tokens inline (each tokenizer knows some of them)
    "<s>Hello</s>", "Hello <|endoftext|> world", "<|im_start|>user\nHi<|im_end|>\n",
    "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>", "|||IP_ADDRESS||| and |||EMAIL_ADDRESS|||",
    "<think>x</think>", "<unk>", "<|padding|>", "<|endoftext|><|endoftext|>", " <s> ", "<s><s>",
    "<|end_of_text|>fim<fim_prefix>", "<|start_of_role|>user<|end_of_role|>",
    # whitespace runs (OLMoE has added tokens for runs of 2..24 spaces)
    "a" + " " * 30 + "b", "    code indented\n        more", "x" + " " * 2 + "y" + " " * 3 + "z" + " " * 25 + "w",
    " " * 24, " " * 50, "\t\t\t\t", "def f():\n    return 1\n",
    # unusual white space and controls
    "a\u180eb", "nbsp\u00a0here", "ideographic\u3000space", "\u2028line sep", "zero\u200bwidth", "soft\u00adhyphen",
    "\x00\x01\x7f ctrl", "\u0085 NEL", "\x1c\x1d\x1e\x1f seps", "\ufeffBOM",
    "a" * 300, "supercalifragilisticexpialidocious" * 10,
    "!!!???...,,,", "(parenthetical) [brackets] {braces}", "email@example.com http://example.com/path?q=1&r=2",
    "C++ and C# and F#", "$100.00 €50 £30 ¥1000", "math: ∑ ∫ √ ∞ ≠ ≤ ≥", "ǅ ǈ ŉ", "ß ẞ", "İstanbul ı",
    "ﬁ ligature", "Ⅻ roman", "①②③", "٣٤٥ arabic digits", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀 hieroglyph", "\U0001F9FF",
    "The Eiffel Tower is located in Paris.", "  ▁already▁metaspace", "▁", "▁▁x",
    "end with newline\n", "\nstart with newline", "mixed \t \n \r\n   spacing", "ĠĊ bytelevel chars",
    # for the synthetic variants (added-token flags, normalized added tokens)
    "say hello to [MASK] and <sep>  next", "  [MASK]  ", "othello hello_world hello, hello", "ﬁne fine fi",
    "foo bar baz", "say foo bar", "foo  bar", "well-known semi-colon; a,b;c 12-34",
    # planes 4-7 (lead byte F1; Granite's vocab has no byte-level char for it)
    "a\U00040000b", "x \U00050000\U00070001 y",
]

FUZZ_POOL = [
    "a", "b", "the", "The", "Paris", "hello", "world", "x", "Q", "ing", "'s", "'ll", "'T", "0", "7", "42", "1999",
    " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", ".", ",", "!", "?", "-", "_", "/", "(", ")", "\"", "'", "#",
    "é", "e\u0301", "ö", "o\u0308", "\u0301", "\u0323", "ñ", "ç", "ß", "中", "文", "日本", "한", "\u1100\u1161",
    "Ж", "жизнь", "Москва", "ا", "م", "😀", "🏽", "👍", "\u200d", "€", "£", "¥", "∑", "ﬁ", "Ⅻ", "①",
    "\u00a0", "\u3000", "\u2028", "\u180e", "\x00", "\x7f", "▁", "Ġ", "Ċ",
    "<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|padding|>", "|||IP_ADDRESS|||",
    "<｜begin▁of▁sentence｜>", "<think>", "[MASK]", "<sep>", "foo bar",
]


def build_edge_and_fuzz():
    rng = random.Random(20240611)
    fuzz = []
    seen = set(EDGE)
    while len(fuzz) < 300:
        n = rng.randint(1, 24)
        s = "".join(rng.choice(FUZZ_POOL) for _ in range(n))
        if s not in seen:
            seen.add(s)
            fuzz.append(s)
    return list(EDGE), fuzz


def counterfact_strings(path):
    data = json.load(open(path, encoding="utf-8"))
    out, seen = [], set()

    def add(s):
        if s not in seen:
            seen.add(s)
            out.append(s)

    for r in data:
        rr = r["requested_rewrite"]
        add(rr["prompt"].format(rr["subject"]))
        add(rr["subject"])
        add(" " + rr["target_new"]["str"])
        add(" " + rr["target_true"]["str"])
        for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            for s in r[key]:
                add(s)
    return out


# ---- binary helpers --------------------------------------------------------------------------------------------
def varint(n):
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag(n):
    return (n << 1) if n >= 0 else ((-n) << 1) - 1


def blob(b):
    return varint(len(b)) + b


def fnv1a64(data):
    h = 0xCBF29CE484222325
    mask = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & mask
    return h


def enc_digest(ids, offsets):
    words = bytearray()
    for i, (b, e) in zip(ids, offsets):
        words += i.to_bytes(4, "little") + b.to_bytes(4, "little") + e.to_bytes(4, "little")
    return fnv1a64(bytes(words))


def brotli_write(path, data):
    raw = path + ".tmp"
    with open(raw, "wb") as f:
        f.write(data)
    subprocess.run(["brotli", "-f", "-q", "11", "-w", "24", "-o", path, raw], check=True)
    os.remove(raw)


def brotli_read(path):
    return subprocess.run(["brotli", "-d", "-c", path], check=True, capture_output=True).stdout


# ---- encoding ----------------------------------------------------------------------------------------------------
def decode_diff(dec, text):
    d, t = dec.encode("utf-8"), text.encode("utf-8")
    k = 0
    while k < len(d) and k < len(t) and d[len(d) - 1 - k] == t[len(t) - 1 - k]:
        k += 1
    return varint(k) + blob(d[:len(d) - k])


def encode_record(tok, s, digest=False):
    e = tok.encode(s)
    ns = tok.encode(s, add_special_tokens=False)
    ids, offs, pieces = e.ids, e.offsets, e.tokens
    n = len(ids)
    # the template must only add tokens around the sequence: find where encode(add_special_tokens=False) sits
    mask = e.special_tokens_mask
    m = len(ns.ids)
    k_pre = next((k for k in range(n - m + 1) if ids[k:k + m] == ns.ids and all(mask[:k])
                  and all(mask[k + m:])), None)
    assert k_pre is not None, (s, ids, ns.ids)
    k_post = n - k_pre - m
    assert list(offs[k_pre:k_pre + m]) == list(ns.offsets), s
    dec = tok.decode(ids, skip_special_tokens=False)
    dec_skip = tok.decode(ids, skip_special_tokens=True)
    out = bytearray(varint(n))
    if digest:
        out += enc_digest(ids, offs).to_bytes(8, "little")
    else:
        for i in ids:
            out += varint(i)
        prev = 0
        for b, en in offs:
            out += varint(zigzag(b - prev)) + varint(en - b)
            prev = en
    out += varint(k_pre) + varint(k_post)
    flags = 0
    if all(tok.id_to_token(i) == p for i, p in zip(ids, pieces)):
        flags |= 1
    if dec == s:
        flags |= 2
    if dec_skip == s:
        flags |= 4
    if dec_skip == dec:
        flags |= 8
    out += varint(flags)
    if not flags & 1:
        for p in pieces:
            out += blob(p.encode("utf-8"))
    if not flags & 2:
        out += decode_diff(dec, s)
    if not (flags & 4 or flags & 8):
        out += decode_diff(dec_skip, s)
    return bytes(out), dec == s, dec_skip == s


def whole_trailer(tok, text):
    e = tok.encode(text)
    dec = tok.decode(e.ids, skip_special_tokens=False)
    return (varint(len(e.ids)) + enc_digest(e.ids, e.offsets).to_bytes(8, "little")
            + fnv1a64(dec.encode("utf-8")).to_bytes(8, "little") + varint(2 if dec == text else 0)), len(e.ids)


# ---- synthetic variants -------------------------------------------------------------------------------------------
def added(content, **kw):
    d = {"id": 0, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
         "special": False}
    d.update(kw)
    return d


def bl(prefix=False, trim=True, regex=True):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim, "use_regex": regex}


def split(pattern, behavior, invert=False, literal=False):
    return {"type": "Split", "pattern": {"String" if literal else "Regex": pattern}, "behavior": behavior,
            "invert": invert}


VARIANTS = [
    {"name": "gpt2-split-behaviours", "base": "gpt2", "set": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        split("[,;]", "MergedWithPrevious"), split("\\d", "Contiguous"), split("-", "MergedWithNext", literal=True),
        split("\\s+", "Removed"), bl(regex=True)]}}},
    {"name": "gpt2-split-invert", "base": "gpt2", "set": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        split("\\p{L}+|\\p{N}+", "Removed", invert=True), split("[aeiou]", "Isolated", invert=True),
        bl(regex=False)]}}},
    {"name": "gpt2-prefix-trim", "base": "gpt2", "set": {
        "pre_tokenizer": bl(prefix=True, trim=True, regex=True),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}},
    {"name": "gpt2-added-flags", "base": "gpt2", "set": {"normalizer": {"type": "NFKC"}}, "add": [
        added("[MASK]", lstrip=True, normalized=False, special=True),
        added("<sep>", rstrip=True, normalized=False, special=True),
        added("hello", single_word=True),
        added("wor"),
        added("\ufb01", special=False),  # "ﬁ": matched through its NFKC form "fi"
    ]},
    {"name": "gpt2-ignore-merges", "base": "gpt2", "set": {"model.ignore_merges": True}},
    {"name": "gpt2-normalizers", "base": "gpt2", "set": {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFD"}, {"type": "Replace", "pattern": {"Regex": "\\p{Mn}"}, "content": ""}, {"type": "NFKC"},
        {"type": "Strip", "strip_left": True, "strip_right": True},
        {"type": "Replace", "pattern": {"String": "  "}, "content": " "}]}}},
    {"name": "mistral-metaspace-always-split", "base": "mistral-7b-v0.1", "set": {
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}}},
    {"name": "mistral-metaspace-never", "base": "mistral-7b-v0.1", "set": {
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]}}},
    {"name": "mistral-unk-fused", "base": "mistral-7b-v0.1", "set": {"model.byte_fallback": False}},
    {"name": "mistral-unk-unfused", "base": "mistral-7b-v0.1", "set": {"model.byte_fallback": False,
                                                                        "model.fuse_unk": False}},
    {"name": "mixtral-normalized-added", "base": "mixtral-8x7b-v0.1", "add": [
        added("foo bar"), added("baz", lstrip=True, rstrip=True, normalized=False)]},
    {"name": "qwen2-template", "base": "qwen2-0.5b", "set": {"post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [151644], "tokens": ["<|im_start|>"]},
                           "<|im_end|>": {"id": "<|im_end|>", "ids": [151645], "tokens": ["<|im_end|>"]}}}}},
]
VARIANT_CF_STRINGS = 300  # variants are checked on edge + fuzz + this many CounterFact strings


def apply_variant(base_json, v):
    d = copy.deepcopy(base_json)
    for path, value in v.get("set", {}).items():
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    d["added_tokens"] = d.get("added_tokens", []) + v.get("add", [])
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizers"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    files = os.path.join(out, "files")
    os.makedirs(files, exist_ok=True)

    # 1. the corpus
    edge, fuzz = build_edge_and_fuzz()
    cf = counterfact_strings(os.path.join(args.data, "counterfact", "counterfact_preknown.json"))
    raw = open(os.path.join(args.data, "wikitext-2-raw", "wiki.test.raw"), "rb").read().decode("utf-8")
    wiki_lines = raw.split("\n")
    assert "\n".join(wiki_lines) == raw
    corpus = [(0, s) for s in edge] + [(1, s) for s in fuzz] + [(2, s) for s in cf] + [(3, s) for s in wiki_lines]
    blob_c = bytearray(b"MTC1" + varint(len(corpus)))
    for cat, s in corpus:
        blob_c += varint(cat) + blob(s.encode("utf-8"))
    brotli_write(os.path.join(out, "corpus.bin.br"), bytes(blob_c))
    n_variant = len(edge) + len(fuzz) + VARIANT_CF_STRINGS

    manifest = {"generator": "tools/gen_tokenizer_vectors.py", "tokenizers_version": tokenizers.__version__,
                "corpus": {"edge": len(edge), "fuzz": len(fuzz), "counterfact": len(cf), "wikitext_lines": len(wiki_lines),
                           "total": len(corpus)},
                "tokenizers": [], "variants": []}
    jsons = {}

    # 2. the real tokenizers
    for name, rel, lic, origin in TOKENIZERS:
        src = os.path.join(args.data, "tokenizers", rel)
        dst = os.path.join(files, name + ".json.br")
        if src.endswith(".br"):
            shutil.copyfile(src, dst)
            text = brotli_read(src)
        else:
            text = open(src, "rb").read()
            brotli_write(dst, text)
        jsons[name] = json.loads(text)
        tok = Tokenizer.from_str(text.decode("utf-8"))
        body = bytearray(b"MTV1" + varint(len(corpus)))
        rt, rt_skip = 0, 0
        for cat, s in corpus:
            rec, ok, ok_skip = encode_record(tok, s, digest=(cat == 3))
            body += rec
            rt += ok
            rt_skip += ok_skip
        trailer, whole_n = whole_trailer(tok, raw)
        body += trailer
        brotli_write(os.path.join(out, name + ".vec.br"), bytes(body))
        manifest["tokenizers"].append({"name": name, "file": "files/" + name + ".json.br", "origin": origin,
                                       "license": lic, "sha256": hashlib.sha256(text).hexdigest(),
                                       "roundtrip": rt, "roundtrip_skip_special": rt_skip,
                                       "whole_wikitext_tokens": whole_n})
        print(f"{name}: {len(corpus)} strings, decode round-trips {rt} (skip_special: {rt_skip}), "
              f"whole file {whole_n} tokens", file=sys.stderr)
    shutil.copyfile(os.path.join(args.data, "tokenizers", "mixtral-8x7b-v0.1", "tokenizer_config.json"),
                    os.path.join(files, "mixtral-8x7b-v0.1.tokenizer_config.json"))

    # 3. synthetic variants
    for v in VARIANTS:
        d = apply_variant(jsons[v["base"]], v)
        tok = Tokenizer.from_str(json.dumps(d))
        body = bytearray(b"MTV1" + varint(n_variant))
        for cat, s in corpus[:n_variant]:
            body += encode_record(tok, s, digest=(cat == 3))[0]
        brotli_write(os.path.join(out, v["name"] + ".vec.br"), bytes(body))
        manifest["variants"].append(v["name"])
        print(f"{v['name']}: {n_variant} strings", file=sys.stderr)
    with open(os.path.join(out, "variants.json"), "w", encoding="utf-8") as f:
        json.dump(VARIANTS, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
