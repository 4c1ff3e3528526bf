"""Build this folder's SQuAD slice from the three public copies named in README.md (run once; the output is committed).

    python bench/data/squad_slice/build.py EXPLORER_TRAIN EXPLORER_DEV SAN_MRC_DEV_V2

train-v1.1.json: SQuAD v1.1 train's University_of_Notre_Dame and v1.1 dev's Super_Bowl_50, whole articles.
dev-v1.1.json:   the answerable questions of five SQuAD v2.0 dev articles (Normans, Computational_complexity_theory,
                 Southern_California, Sky_(United_Kingdom), Victoria_(Australia)); unanswerable ones are dropped.
The two files share no article, so no test passage is ever seen in training.
"""

import json
import sys
from pathlib import Path


def articles(path: str) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["data"]


def answerable(article: dict) -> dict:
    paragraphs = []
    for p in article["paragraphs"]:
        qas = [{"id": q["id"], "question": q["question"], "answers": q["answers"]}
               for q in p["qas"] if q["answers"] and not q.get("is_impossible")]
        if qas:
            paragraphs.append({"context": p["context"], "qas": qas})
    return {"title": article["title"], "paragraphs": paragraphs}


def main(explorer_train: str, explorer_dev: str, san_mrc_dev_v2: str) -> None:
    out = Path(__file__).parent
    train = [answerable(a) for a in articles(explorer_train) + articles(explorer_dev)]
    test = [answerable(a) for a in articles(san_mrc_dev_v2)]
    assert not {a["title"] for a in train} & {a["title"] for a in test}
    for name, data in (("train-v1.1.json", train), ("dev-v1.1.json", test)):
        (out / name).write_text(json.dumps({"version": "1.1", "data": data}, ensure_ascii=False) + "\n", encoding="utf-8")
        n = sum(len(p["qas"]) for a in data for p in a["paragraphs"])
        print(f"{name}: {len(data)} articles, {n} questions")


if __name__ == "__main__":
    main(*sys.argv[1:])
