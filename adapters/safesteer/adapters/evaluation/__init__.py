"""`safesteer eval`: run a model (+ adapter) over prompt sets, judge, score, report.

Modules, one idea each: `prompt_sets` (what is asked), `modes` (how a batch is steered),
`runner` (batched greedy answers), `judging` (refusal judge and its measured accuracy),
`benchmarks` + `utility` (multiple-choice accuracy, perplexity), `metrics` (rates, Wilson
intervals, summaries), `results` (rows and JSON), `plots` + `report` (PNG and Markdown),
`harness` (one run end to end).
"""
