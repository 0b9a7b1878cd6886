"""KServe v2 protocol definitions (`.proto`) and the code generated from them."""
