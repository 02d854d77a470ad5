"""The inputs a run is made from: raw Q/K/V files (:mod:`.qkv`), Hugging Face model\ndirectories (:mod:`.models`) and texts (:mod:`.texts`)."""
