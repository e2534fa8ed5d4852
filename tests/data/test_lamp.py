"""LaMP / LongLaMP loaders on tiny hand-written fixtures."""

import json
import logging

import pytest
from transformers.utils import logging as hf_logging

from transformers_spring.data import read_lamp, temporal_split
from transformers_spring.data.lamp import normalize_task

LAMP4_QUESTIONS = [
    {
        "id": "310",
        "input": "Generate a headline for the following article: Markets rallied today.",
        "profile": [
            {"id": "3100", "text": "The senate voted.", "title": "Senate Votes", "date": "2013-05-02"},
            {"id": "3101", "text": "A storm hit.", "title": "Storm Hits Coast", "date": "2012-11-20"},
            {"id": "3102", "text": "No title here.", "date": "2013-01-01"},
            {"id": "3103", "title": "No text here", "date": "2013-01-02"},
        ],
    },
    {
        "id": "311",
        "input": "Generate a headline for the following article: Rain expected.",
        "profile": [{"id": "3110", "text": "Cats nap.", "title": "Cats Nap A Lot", "date": "2014-02-03"}],
    },
]
LAMP4_OUTPUTS = {
    "task": "LaMP_4",
    "golds": [{"id": "310", "output": "Markets Rally"}, {"id": "311", "output": "Rain"}],
}

LONGLAMP_ROWS = [
    {
        "name": "Ada Lovelace",
        "input": "Generate an abstract for the title: Engines",
        "output": "We study engines.",
        "profile": [
            {"id": "p1", "title": "Numbers", "abstract": "On numbers.", "year": 1843},
            {"id": "p2", "title": "Notes", "abstract": "Some notes.", "year": 1842},
            {"id": "p3", "title": "No abstract", "year": 1844},
        ],
    },
    {
        "name": "Alan Turing",
        "input": "Generate an abstract for the title: Machines",
        "output": "We study machines.",
        "profile": [{"id": "q1", "title": "Computable", "abstract": "On computable numbers.", "year": "1936"}],
    },
]


def dump(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def lamp4(tmp_path):
    return dump(tmp_path / "dev_questions.json", LAMP4_QUESTIONS), dump(tmp_path / "dev_outputs.json", LAMP4_OUTPUTS)


@pytest.fixture
def warnings_seen(caplog):
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING, logger="transformers_spring.data.lamp"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == "transformers_spring.data.lamp"]
    hf_logging.disable_propagation()


def test_lamp4_profiles_become_timed_streams(lamp4, warnings_seen):
    items = read_lamp(*lamp4)
    assert [(i.user_id, i.prompt, i.response) for i in items] == [
        ("310", "A storm hit.", "Storm Hits Coast"),
        ("310", "The senate voted.", "Senate Votes"),
        ("311", "Cats nap.", "Cats Nap A Lot"),
    ]
    assert items[0].metadata == {"task": "LaMP_4", "date": "2012-11-20", "source_id": "3101"}
    assert items[0].id == "310#3101"  # ids hold no path separator
    assert items[0].timestamp < items[1].timestamp
    (message,) = warnings_seen()
    assert "skipped 2 of 5" in message


def test_include_queries_appends_the_question_after_the_profile(lamp4):
    items = read_lamp(*lamp4, include_queries=True)
    ana = [i for i in items if i.user_id == "310"]
    assert ana[-1].prompt == "Markets rallied today."  # LaMP's fixed instruction stripped, as profile items have none
    assert ana[-1].response == "Markets Rally" and ana[-1].metadata["query"] is True and ana[-1].id == "310"
    assert ana[-1].timestamp >= ana[-2].timestamp


LAMP7_QUESTIONS = [  # LaMP-7's layout: profile items hold only the user's tweets (text, id, date)
    {
        "id": "700",
        "input": "Paraphrase the following tweet without any explanation before or after it: my cat is so cute",
        "profile": [
            {"text": "rainy monday again", "id": "7000", "date": "2009-04-07"},
            {"text": "coffee first, then work", "id": "7001", "date": "2009-04-06"},
            {"text": "", "id": "7002", "date": "2009-04-08"},
        ],
    }
]


def test_lamp7_tweets_are_text_only_items_and_the_question_is_the_bare_tweet(tmp_path):
    questions = dump(tmp_path / "dev_questions.json", LAMP7_QUESTIONS)
    outputs = dump(tmp_path / "dev_outputs.json", {"task": "LaMP_7", "golds": [{"id": "700", "output": "my cat!!"}]})
    items = read_lamp(questions, outputs, include_queries=True)
    assert [(i.prompt, i.response, i.metadata.get("text_only")) for i in items] == [
        ("coffee first, then work", "coffee first, then work", True),
        ("rainy monday again", "rainy monday again", True),
        ("my cat is so cute", "my cat!!", None),
    ]
    assert items[0].metadata["date"] == "2009-04-06" and items[-1].metadata["query"] is True
    assert normalize_task("LaMP-7") == "LaMP_7"


def test_a_question_that_is_only_the_instruction_keeps_it(tmp_path):
    rows = [dict(LAMP4_QUESTIONS[1], input="Generate a headline for the following article: ")]
    outputs = dump(tmp_path / "o.json", {"task": "LaMP_4", "golds": [{"id": "311", "output": "Rain"}]})
    items = read_lamp(dump(tmp_path / "q.json", rows), outputs, include_queries=True)
    assert items[-1].prompt == "Generate a headline for the following article: "


def test_include_queries_needs_golds(lamp4, tmp_path):
    outputs = dump(tmp_path / "partial_outputs.json", {"task": "LaMP_4", "golds": [{"id": "310", "output": "x"}]})
    with pytest.raises(ValueError, match=r"question '311'"):
        read_lamp(lamp4[0], outputs, include_queries=True)


def test_task_required_without_outputs(lamp4):
    with pytest.raises(ValueError, match="task is unknown"):
        read_lamp(lamp4[0])
    assert len(read_lamp(lamp4[0], task="LaMP-4")) == 3


def test_task_conflict_and_unknown_task(lamp4):
    with pytest.raises(ValueError, match="dev_outputs.json"):
        read_lamp(*lamp4, task="LaMP_5")
    with pytest.raises(ValueError, match="LaMP_2.*no \\(prompt, response\\) field preset"):
        read_lamp(lamp4[0], task="LaMP_2")
    with pytest.raises(ValueError, match="'made_up'"):
        read_lamp(lamp4[0], task="made_up")


def test_override_fields(lamp4):
    # Unknown task, but explicit fields: headline -> article text, and dates still read from "date".
    items = read_lamp(lamp4[0], task="made_up", prompt_field="title", response_field="text", timestamp_field="date")
    assert (items[0].prompt, items[0].response) == ("Storm Hits Coast", "A storm hit.")
    items = read_lamp(*lamp4, response_field="text")
    assert (items[0].prompt, items[0].response) == ("A storm hit.", "A storm hit.")


def test_longlamp_abstract_generation_json_and_jsonl(tmp_path, warnings_seen):
    as_json = dump(tmp_path / "val.json", LONGLAMP_ROWS)
    as_jsonl = tmp_path / "val.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(row) for row in LONGLAMP_ROWS) + "\n", encoding="utf-8")
    for path in (as_json, as_jsonl):
        items = read_lamp(path, task="abstract_generation_user", include_queries=True)
        assert [(i.user_id, i.prompt, i.metadata.get("date")) for i in items] == [
            ("Ada Lovelace", "Notes", "1842"),
            ("Ada Lovelace", "Numbers", "1843"),
            ("Ada Lovelace", "Generate an abstract for the title: Engines", None),
            ("Alan Turing", "Computable", "1936"),
            ("Alan Turing", "Generate an abstract for the title: Machines", None),
        ]
        assert items[1].response == "On numbers." and items[2].response == "We study engines."
        assert items[2].metadata == {"task": "abstract_generation", "query": True}
    assert all("skipped 1 of 4" in message for message in warnings_seen())


def test_untimed_profiles_keep_profile_order(tmp_path):
    rows = [
        {
            "author": "writer",
            "input": "Write about cats",
            "output": "Cats rule.",
            "profile": [{"summary": f"s{i}", "content": f"c{i}"} for i in range(12)],
        }
    ]
    items = read_lamp(dump(tmp_path / "topic.json", rows), task="topic_writing", include_queries=True)
    assert [i.prompt for i in items] == [f"s{i}" for i in range(12)] + ["Write about cats"]
    periods = temporal_split(items, num_periods=2)["writer"]
    assert periods[1].test[-1].prompt == "Write about cats"


def test_product_review_times(tmp_path):
    rows = [
        {
            "reviewerId": "A1",
            "input": "x",
            "output": "y",
            "profile": [
                {"summary": "late", "reviewText": "t", "reviewTime": "09 13, 2014"},
                {"summary": "early", "reviewText": "t", "unixReviewTime": 1104537600},
            ],
        }
    ]
    items = read_lamp(dump(tmp_path / "reviews.json", rows), task="product_review_temporal")
    assert [(i.user_id, i.prompt, i.metadata["date"]) for i in items] == [
        ("A1", "early", "2005-01-01"),
        ("A1", "late", "2014-09-13"),
    ]


def test_malformed_question_names_file_and_id(tmp_path):
    path = dump(tmp_path / "q.json", [{"id": "42", "input": "x", "profile": "not a list"}])
    with pytest.raises(ValueError, match=r"q\.json, question '42'.*profile"):
        read_lamp(path, task="LaMP_4")


def test_normalize_task():
    assert normalize_task("lamp-5") == "LaMP_5"
    assert normalize_task("LongLaMP_topic_writing_user") == "topic_writing"
    assert normalize_task("LaMP_7") == "LaMP_7"
