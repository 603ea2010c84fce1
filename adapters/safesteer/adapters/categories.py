"""The project's harm categories, each with the one-line description stored in adapters."""

CATEGORIES: dict[str, str] = {
    "violence": "Physical harm to people or animals: assault, murder, terrorism, torture.",
    "weapons": "Making, acquiring or using weapons and explosives, including CBRN weapons.",
    "cybercrime": "Hacking, malware, intrusion, denial of service and other computer crime.",
    "fraud": "Scams, phishing, theft, counterfeiting, forgery and financial crime.",
    "drugs": "Making, buying, selling or abusing illegal or controlled drugs.",
    "hate": "Hate speech, harassment and discrimination against people or groups.",
    "self_harm": "Suicide, self-injury and eating disorders.",
    "sexual": "Sexual content involving minors, non-consent or exploitation.",
    "privacy": "Surveillance, stalking, doxxing and misuse of personal data.",
    "misinformation": "Disinformation, propaganda, fake news and defamation.",
}
