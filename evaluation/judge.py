"""AI-judged metrics: coherence, fluency and relevance (1-5) rated by an Azure OpenAI chat deployment.

Optional: used by `phi3flow eval --judge CONN` when an Azure OpenAI connection exists; the metrics without
a judge (ROUGE-L, BLEU, token F1, length ratio) never need one. The rubrics follow the prompt-based
evaluators of azure-ai-evaluation, reduced to a single-number answer so they are cheap and parseable.
"""

from __future__ import annotations

import re

from phi3flow.errors import Phi3flowError

# metric -> rubric (higher is better for all of them)
JUDGED: dict[str, str] = {
    "coherence": "Coherence: does the answer read as a logical, well-organised whole that addresses the question? "
    "1 = incoherent, 5 = perfectly coherent.",
    "fluency": "Fluency: is the answer grammatical, well-worded and easy to read, regardless of its content? "
    "1 = broken language, 5 = flawless.",
    "relevance": "Relevance: does the answer address the question with the key information it asks for? "
    "1 = off-topic, 5 = fully relevant and complete.",
}
SYSTEM = "You are an impartial evaluator of AI assistant answers. Reply with a single digit from 1 to 5 and nothing else."


class JudgeError(Phi3flowError, RuntimeError):
    """The judge could not be reached or gave no rating; the message says which."""


class Judge:
    """Rates one answer on every JUDGED metric through an Azure OpenAI chat completions deployment."""

    def __init__(self, endpoint: str, key: str, deployment: str, api_version: str = "2024-06-01"):
        from openai import AzureOpenAI

        self.deployment = deployment
        self.client = AzureOpenAI(azure_endpoint=endpoint, api_key=key, api_version=api_version, max_retries=3, timeout=60)

    @classmethod
    def from_connection(cls, name: str, deployment: str) -> Judge:
        """From a Prompt Flow AzureOpenAIConnection (api_base, api_key, api_version)."""
        from promptflow.client import PFClient

        try:
            connection = PFClient().connections.get(name, with_secrets=True)
        except Exception as exc:  # promptflow's not-found error types vary by version
            raise JudgeError(
                f"cannot read Azure OpenAI connection '{name}' ({type(exc).__name__}): create it with "
                "'pf connection create' (type azure_open_ai)"
            ) from None
        if getattr(connection, "api_base", None) is None:
            raise JudgeError(f"connection '{name}' is not an Azure OpenAI connection (it has no api_base)")
        return cls(connection.api_base, connection.api_key, deployment, getattr(connection, "api_version", None) or "2024-06-01")

    def rate(self, question: str, answer: str) -> dict[str, float]:
        """{metric: 1..5} for one question/answer pair."""
        from openai import OpenAIError

        ratings = {}
        for metric, rubric in JUDGED.items():
            prompt = f"{rubric}\n\nQuestion: {question}\n\nAnswer: {answer}\n\nRating (1-5):"
            try:
                reply = self.client.chat.completions.create(
                    model=self.deployment,
                    temperature=0,
                    max_tokens=3,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                )
            except OpenAIError as exc:
                raise JudgeError(f"the judge deployment '{self.deployment}' failed: {type(exc).__name__}") from None
            match = re.search(r"[1-5]", reply.choices[0].message.content or "")
            if not match:
                raise JudgeError(f"the judge gave no 1-5 rating for {metric}")
            ratings[metric] = float(match.group())
        return ratings
