"""T3 of Chatterbox-Turbo and Chatterbox-Nano: a GPT-2 backbone, no guidance, sampled with top-k/top-p."""
