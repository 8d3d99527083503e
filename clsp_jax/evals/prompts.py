"""The paper's zero-shot tasks: for each, the label field it predicts and its prompts in the authors' order.

    ZERO_SHOT_TASKS[name] = (label_key, [(prompt, label), ...])

`label_key` names the label in a manifest cut's ``supervisions[0].custom`` (``data_prep.eval_sets`` writes
these labels). Several prompts may predict one label: IEMOCAP's "excited" prompt predicts happy, as its exc
class is merged into hap (the paper's 4 classes). Every task but "gender" is one of the paper's
(<dataset>_<label>); "gender" puts the paper's gender prompts to any set with gender labels (the in-training
check on a prepared split's gender tags).
"""

EMOTION_PROMPT = "A speaker in a {} tone."
GENDER_PROMPTS = [("A male speaker.", "male"), ("A female speaker.", "female")]

ZERO_SHOT_TASKS = {
    "ravdess_emotion": ("emotion", [(EMOTION_PROMPT.format(e), e) for e in
                                    ("angry", "calm", "disgust", "fear", "happy", "sad", "surprised", "neutral")]),
    "ravdess_gender": ("gender", GENDER_PROMPTS),
    "cremad_emotion": ("emotion", [(EMOTION_PROMPT.format(e), e) for e in
                                   ("happy", "sad", "angry", "fear", "disgust", "neutral")]),
    "cremad_age": ("age_bin", [("A child or young teenager speaker.", "<20"), ("An adult speaker.", "20-39"),
                               ("A middle-aged speaker.", "40-59"), ("An older or elder speaker.", ">=60")]),
    "iemocap_emotion": ("emotion", [(EMOTION_PROMPT.format(e), label) for e, label in
                                    (("happy", "happy"), ("excited", "happy"), ("angry", "angry"),
                                     ("sad", "sad"), ("neutral", "neutral"))]),
    # The paper's gender prompts on any set with male/female labels (the prepared splits' gender tags).
    "gender": ("gender", GENDER_PROMPTS),
}
