"""Tools for the demo, the tests and local development: the tiny model, its corpus and a
local Kafka broker. Nothing in `loraloop.core`, `loraloop.service` or `loraloop.learner`
imports this package."""
