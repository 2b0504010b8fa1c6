"""Captions for Fashion-MNIST images: the offline image-text source (`fashion-mnist-captions`) for CLIP tests and
recipes.

Each caption is built from the image's class and from the image itself, deterministically from (split, index):
- a noun for the class (3 synonyms each, e.g. Sneaker: "sneaker" / "trainer" / "running shoe"),
- an attribute word of the class (4 each, e.g. Coat: "warm", "buttoned", "winter", "heavy"),
- a tone word measured on the image: the mean of its garment pixels (value > 0) below 100 is "dark", above 170
  "light", else "grey" (each with 2 synonyms), so captions say something the label alone does not,
- one of 8 templates.
The choices are a hash of (split, index): re-writing the source gives the same captions, whatever the shard
seed or limit. Examples: "a photo of a dark warm coat.", "light sporty trainer, product shot.",
"a low-resolution picture of a grey frock, elegant."
"""

from __future__ import annotations

import hashlib

import numpy as np

NOUNS = [
    ["t-shirt", "top", "tee"],
    ["trousers", "pants", "slacks"],
    ["pullover", "sweater", "jumper"],
    ["dress", "frock", "gown"],
    ["coat", "jacket", "overcoat"],
    ["sandal", "flip-flop", "summer sandal"],
    ["shirt", "blouse", "button-up shirt"],
    ["sneaker", "trainer", "running shoe"],
    ["bag", "handbag", "purse"],
    ["ankle boot", "boot", "bootie"],
]
ATTRIBUTES = [
    ["short-sleeved", "casual", "cotton", "plain"],
    ["long", "straight-leg", "casual", "tailored"],
    ["long-sleeved", "knitted", "warm", "cosy"],
    ["elegant", "knee-length", "summer", "flowing"],
    ["warm", "buttoned", "winter", "heavy"],
    ["open-toed", "strappy", "flat", "light"],
    ["collared", "long-sleeved", "formal", "patterned"],
    ["sporty", "low-top", "lace-up", "athletic"],
    ["leather", "shoulder", "small", "structured"],
    ["heeled", "leather", "chunky", "winter"],
]
TONES = {"dark": ["dark", "black"], "grey": ["grey", "mid-grey"], "light": ["light", "pale"]}
TEMPLATES = [
    "a photo of {a} {tone} {attr} {noun}.",
    "{tone} {attr} {noun}, product shot.",
    "a low-resolution picture of {a} {tone} {noun}, {attr}.",
    "{a} {attr} {noun} in {tone}.",
    "this {noun} is {attr} and {tone}.",
    "a black-and-white image of {a} {attr} {noun}.",
    "catalogue item: {tone} {noun}.",
    "{a} {noun}: {attr}, {tone}.",
]


def tone(image: np.ndarray) -> str:
    """dark / grey / light from the mean of the non-background pixels."""
    garment = image[image > 0]
    mean = float(garment.mean()) if garment.size else 0.0
    return "dark" if mean < 100 else "light" if mean > 170 else "grey"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(label: int, image: np.ndarray, split: str, index: int) -> str:
    """The caption of sample `index` of `split` (see the module docstring)."""
    h = hashlib.blake2b(f"{split}:{index}".encode(), digest_size=8).digest()
    noun = NOUNS[label][h[0] % len(NOUNS[label])]
    attr = ATTRIBUTES[label][h[1] % len(ATTRIBUTES[label])]
    tones = TONES[tone(image)]
    word = tones[h[2] % len(tones)]
    template = TEMPLATES[h[3] % len(TEMPLATES)]
    # the article agrees with the word that follows it in the template
    following = {"{a} {tone}": word, "{a} {attr}": attr, "{a} {noun}": noun}
    nxt = next((w for pat, w in following.items() if pat in template), noun)
    text = template.format(a=_article(nxt), tone=word, attr=attr, noun=noun)
    return text


def captions(images: np.ndarray, labels: np.ndarray, split: str) -> list[str]:
    return [caption(int(y), images[i], split, i) for i, y in enumerate(labels)]
