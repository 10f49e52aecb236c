"""A tiny byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template, built offline.

Why not Qwen's own tokenizer: it has 151k tokens (an embedding table bigger than the whole tiny
model) and cannot be downloaded here. This one is trained in-process on the project's own text (the
instruction template filled with synthetic expressions, think/answer targets, JSON punctuation), so
prompts are short and every id is meaningful to a tiny model. Digits are always single tokens
(a pre-tokenizer splits them one by one), so a coordinate is a sequence of digit tokens the model can
learn compositionally - the learnability probe found this works, and it works better than one token
per number 0-255 (benchmarks/learnability.py's study: with number tokens the same policy had not
localised after 2000 steps; with digits it had by step 1500). Byte-level BPE keeps every byte in
the vocabulary, so any text (real dataset expressions included) is encodable.

Qwen2.5-VL's 14 special tokens follow the BPE vocabulary in Qwen's order, with Qwen's roles: eos
``<|im_end|>``, pad ``<|endoftext|>``, left padding (generation pads prompts on the left). The four
answer-format tags come last, as ordinary added tokens (see :data:`TAG_TOKENS`).
"""

from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from verl_grto.agent.templates import content_parts
from verl_grto.data.schema import build_instruction, build_short_instruction
from verl_grto.data.synthetic import random_expression
from verl_grto.reward.answer import ToolPrompt, format_answer

#: Qwen2.5-VL's special tokens, in Qwen's id order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
#: The answer-format tags are single (non-special) tokens: the format is then a fixed token pattern,
#: whatever characters surround a tag, and decoding with ``skip_special_tokens=True`` keeps them.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
#: Tokens a policy must never sample: they make the next forward pass look for images that do not exist.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

#: Total vocabulary: BPE tokens (bytes + merges), then the special tokens, then the tag tokens.
VOCAB_SIZE = 1024
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
_CORPUS_SEED = 1234  # the tokenizer does not depend on the model seed: checkpoints stay comparable
_CORPUS_SIZE = 4000

# Qwen2.5-VL's chat format: a default system turn, `<|im_start|>role\n...<|im_end|>\n` per message, an
# image content part becomes `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the
# pad to one token per merged patch). String content is rendered as is: verl's RLHFDataset has already
# split `<image>` placeholders into {"type": "image"} parts before it calls apply_chat_template.
# No whitespace control: the template is one line, so every newline in it is meant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}" + content_parts("message['content']") + "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Words of real referring / reasoning-segmentation / camouflage / remote-sensing datasets, so their
# expressions do not fall apart into single bytes (and the BPE has enough distinct words to fill its vocabulary).
_EXTRA_TEXT = (
    "man woman person people boy girl child kid guy lady player baby dog cat horse cow sheep bird elephant "
    "zebra giraffe bear car truck bus bike bicycle motorcycle train boat plane airplane chair couch sofa bed "
    "table bench umbrella bottle cup bowl glass plate pizza cake sandwich banana apple orange donut laptop "
    "phone book clock vase tree sign light window door wall building shirt jacket coat hat cap helmet shoes "
    "jeans dress skirt white black gray grey brown dark bright left right middle center front back behind "
    "near next closest farthest far top bottom upper lower second first third fourth last side corner edge "
    "half part small smaller smallest big bigger biggest large larger tall taller short long wearing holding "
    "sitting standing walking riding eating looking facing playing lying using carrying with without in on "
    "at of to from by and or that which who whose where what when why how is are was were be can could "
    "would should the a an this these those it its their his her they he she object objects region area "
    "camouflaged hidden concealed animal fish insect lizard frog snake spider crab owl moth butterfly "
    "caterpillar octopus seahorse leopard deer rabbit mask segment segmentation field road river house roof "
    "ship lake forest airport runway harbor harbour bridge stadium farmland parking lot tennis court "
    "baseball diamond storage tank vehicle pool water grass sand rock stone leaf leaves branch sky cloud snow "
    "ground floor kitchen room street sidewalk fence pole picture screen keyboard mouse remote bag backpack "
    "suitcase box basket food drink meat vegetable fruit flower plant pot something someone anything used "
    "for protect protection sleep sleeping cook cooking drive driving read reading write writing sit "
    "carry hold open close because could likely most least one two three four five only other another "
    "both each every all none please identify locate find point show answer think reason image picture "
    "photo The A An Find Please Which What Where Who"
)
_EXTRA_WORDS = tuple(_EXTRA_TEXT.split())


def _corpus(seed: int = _CORPUS_SEED, n: int = _CORPUS_SIZE) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes = (112, 128, 224, 256, 336, 448, 512, 640)
    lines = [DEFAULT_SYSTEM_PROMPT, "system user assistant", " ".join(_EXTRA_WORDS)]
    for _ in range(n):
        expr = random_expression(rng).text()
        w, h = (int(v) for v in rng.choice(sizes, size=2))
        lines.append(build_instruction(expr, width=w, height=h))
        lines.append(build_short_instruction(expr))
        x1, y1 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        n_pts = int(rng.integers(0, 3))
        points = tuple((int(rng.integers(x1, x2)), int(rng.integers(y1, y2))) for _ in range(n_pts))
        prompt = ToolPrompt(box=(x1, y1, x2, y2), points=points, labels=(1,) * n_pts)
        words = " ".join(rng.choice(_EXTRA_WORDS, size=int(rng.integers(2, 8))))
        lines.append(format_answer([prompt], think=f"{expr} is {words}."))
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE on the project's text and wrap it with Qwen2.5-VL's specials and chat template.

    Deterministic: the corpus comes from a fixed seed and the BPE trainer breaks ties by pair order.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {n_bpe}: enlarge the corpus")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
