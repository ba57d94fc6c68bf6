"""The console scripts, one thin module each: parse the arguments, call the library, print the
result on stdout and an error as `fusion-...: error: ...` on stderr (exit code 2). Library chatter
goes to the log (stderr). Nothing in fusion_train imports a command (import-linter checks it).

  fusion-train     commands/train.py     train, plan, print the config, sweep
  fusion-data      commands/data.py      tokenizers, shards, the demo data
  fusion-generate  commands/generate.py  text and pictures from a model
  fusion-convert   commands/convert.py   between model formats
  fusion-report    commands/report.py    a run's, a sweep's or an untied comparison's page
"""
