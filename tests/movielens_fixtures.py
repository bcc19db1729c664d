"""Tiny hand-written MovieLens files in the ML-100K and ML-1M formats (3 users, 4 movies,
7 ratings); tests/unit/data/test_movielens.py holds the rows they must convert to."""

from __future__ import annotations

from pathlib import Path

FLAGS = {  # movie -> its 19 genre flags of u.item
    1: [3, 4, 5],  # Animation, Children's, Comedy
    2: [1, 2, 16],  # Action, Adventure, Thriller
    3: [0],  # unknown
    4: [8],  # Drama
}
RATINGS = [(1, 1, 5), (1, 2, 3), (2, 1, 4), (2, 2, 2), (2, 3, 1), (3, 4, 3), (3, 3, 2)]


def write_100k(d: Path) -> Path:
    d.mkdir()
    items = []
    for m, title, date in [
        (1, "Toy Story (1995)", "01-Jan-1995"),
        (2, "GoldenEye (1995)", "01-Jan-1995"),
        (3, "Caf\xe9 without a date", ""),
        (4, "Old (1922)", "01-Jan-1922"),
    ]:
        flags = ["1" if g in FLAGS[m] else "0" for g in range(19)]
        items.append("|".join([str(m), title, date, "", "http://x"] + flags))
    (d / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    (d / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|T8H1N\n3|17|M|writer|01002\n", encoding="latin-1"
    )
    (d / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t88125{u}{m}\n" for u, m, r in RATINGS))
    return d


def write_1m(d: Path) -> Path:
    d.mkdir()
    (d / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::GoldenEye (1995)::Action|Adventure|Thriller\n"
        "3::Caf\xe9 without a year::Drama\n"
        "4::Old (1922)::Drama\n",
        encoding="latin-1",
    )
    (d / "users.dat").write_text(
        "1::M::18::19::85711\n2::F::50::13::T8H1N\n3::M::1::20::01002\n", encoding="latin-1"
    )
    (d / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::97830{u}{m}\n" for u, m, r in RATINGS))
    return d
