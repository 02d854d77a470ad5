"""The inputs a run is made from: raw Q/K/V files (:mod:`.qkv`), Hugging Face model
directories (:mod:`.models`) and texts (:mod:`.texts`)."""
