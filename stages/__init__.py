"""One thin module per DVC stage; `fedmeta <stage>` runs it."""
