"""Fuzzing of every parser: the targets (`fuzz.targets`), the corpus generator
(`fuzz.make_corpus`) and the coverage-guided runner (`fuzz.run`, behind `make fuzz`)."""
