"""The Mug-STAN post-pretraining trainer (docs/design.md section 3). Imports ``mugstan_chat``; never imported by it."""
