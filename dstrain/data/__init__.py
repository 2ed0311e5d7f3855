"""Input files to token datasets: reading records, chat formats and the chat template, the build
cache, and each stage's rows (pretraining blocks, SFT conversations, preference pairs)."""
