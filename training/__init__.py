"""The Mug-STAN post-pretraining trainer (DESIGN.md section 3). Imports ``mugstan_chat``; never imported by it."""
