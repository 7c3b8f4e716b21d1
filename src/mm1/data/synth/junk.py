"""Low-quality web documents for the synthetic world: what a crawl brings in besides good pages.

MM1's interleaved data come from web crawls that were filtered hard; the quality-filtering finding
(`mm1.ablate.findings`, issue 29) needs a world whose crawl has something to filter. These pages look
like the junk real crawls are full of (navigation menus, cookie banners, keyword spam, link lists,
shop listings, scrambled text) and carry pictures of the world whose text says nothing true about
them, so a model that learns from them learns nothing about the images, and some of their text.
They are written to `junk/docs.parquet` in the same OBELICS layout as the good pages, so that a
crawl of both is one source with two files.
"""

from __future__ import annotations

import random

from mm1.data.synth import language as lang
from mm1.data.synth.scene import COLOURS, SHAPES

NAV = ("Home", "About", "Contact", "Login", "Sign up", "Shop", "Cart", "Blog", "FAQ", "Help", "Terms",
       "Privacy", "Careers", "Press", "Sitemap", "Deals", "Gallery", "Forum", "News", "Support")
BANNERS = ("We use cookies to improve your experience. Accept all | Reject | Settings",
           "This site uses cookies. By continuing to browse you agree to our use of cookies.",
           "Subscribe to our newsletter!!! Enter your email to get 10% off",
           "Click here to download now. Free download. Fast and safe.",
           "Your browser is out of date. Update your browser for more security and speed.",
           "Page 1 of 37 | Next >> | Last >>", "Share on: Facebook Twitter Pinterest Email Print",
           "Copyright (c) All rights reserved. Powered by WordPress.", "ERROR 404 page not found. Go back home.",
           "Loading... please wait", "Advertisement", "Sponsored links", "Related posts you may like")
SPAM = ("best", "cheap", "free", "buy", "online", "top", "deal", "sale", "discount", "wallpaper", "hd",
        "download", "images", "pictures", "2024", "new", "shop", "price", "review", "coupon")
PRODUCTS = ("poster", "sticker", "mug", "t-shirt", "wall art", "clip art", "icon pack", "print", "canvas")


def _nav(rng: random.Random) -> str:
    return " | ".join(rng.sample(NAV, rng.randint(5, 10)))


def _spam(rng: random.Random) -> str:
    words = [*SPAM, *rng.sample(list(COLOURS), 2), *rng.sample(SHAPES, 2)]
    return " ".join(rng.choice(words) for _ in range(rng.randint(12, 30)))


def _links(rng: random.Random) -> str:
    return "\n".join(f"- {rng.choice(SPAM)} {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} "
                     f"{rng.choice(PRODUCTS)} {rng.choice(SPAM)}" for _ in range(rng.randint(4, 9)))


def _listing(rng: random.Random) -> str:
    item = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)} {rng.choice(PRODUCTS)}"
    return (f"{item.upper()} - ${rng.randint(1, 99)}.{rng.randint(0, 99):02d} - SKU {rng.randint(10000, 99999)} "
            f"- In stock: {rng.randint(0, 500)} - Rating {rng.randint(1, 5)}/5 ({rng.randint(0, 9999)} reviews) "
            "- Add to cart")


def _scrambled(rng: random.Random) -> str:
    """Sentences of the world with their words shuffled (a broken text extraction)."""
    words = lang.text_document(rng).split()
    rng.shuffle(words)
    return " ".join(words[: rng.randint(15, 40)])


def _mismatched(rng: random.Random) -> str:
    """A caption-like line naming a picture that is not there (an image's alt text from another page)."""
    return f"{rng.choice(('IMG_', 'DSC', 'photo-', 'image'))}{rng.randint(1000, 9999)}.jpg {rng.choice(SPAM)} " \
           f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)} {rng.choice(SPAM)}"


PIECES = (_spam, _links, _listing, _scrambled, _mismatched)


def junk_page(images: int, rng: random.Random) -> list[str | int]:
    """A junk page: a menu, then `images` pictures (by index) among junk paragraphs, then a banner or two.
    Nothing on it describes its pictures."""
    parts: list[str | int] = [_nav(rng)]
    if rng.random() < 0.5:
        parts.append(rng.choice(BANNERS))
    for k in range(images):
        parts.append(k)
        parts += [rng.choice(PIECES)(rng) for _ in range(rng.randint(1, 2))]
    if images == 0:
        parts += [rng.choice(PIECES)(rng) for _ in range(rng.randint(2, 4))]
    parts += rng.sample(BANNERS, rng.randint(1, 2))
    return parts


def images_on_junk_page(rng: random.Random) -> int:
    """Junk pages often have no picture at all, or a few (thumbnails, ads)."""
    return rng.choice((0, 0, 1, 1, 2, 3))
