"""The instructions given to the vision-language model: what the original release's data-labelling
script and prompt enhancer ask for (nv-tlabs/ChronoEdit ``scripts/data_captioning.py`` and
``scripts/prompt_enhancer.py``), in our own words.

Labelling a pair asks twice: :data:`EDIT_INSTRUCTION` for a concise instruction (or the literal
``no change``), then :data:`REASONING` for ChronoEdit's detailed 80-100-word prompt, the one the
model was trained on. :data:`ENHANCE` turns a user's instruction and the image to edit into that form.
"""

NO_CHANGE = "no change"
INTENT = "The user wants to"

EDIT_INSTRUCTION = f"""You label image edits. The user shows two images, the first and the last frame of one video clip: the original, then the edited result.

If you see no clear visual difference between them, answer exactly: {NO_CHANGE}

Otherwise write one English instruction that would let an image-editing model turn the first image into the second:
- Describe the most prominent change; if there are several, at most the three most important ones, joined by semicolons in one sentence.
- Describe changes to the image itself. For a person, say how their action, appearance or position changes, not what they keep doing in both images.
- Say what to edit, how it looks afterwards (shape, colour, material, pose, object state, relative position) and where it is ("top left corner", "centre", "foreground").
- Be specific and measurable: no vague words such as "nice" or "better", no judgements.
- Do not describe the whole scene or repeat what stays the same.
- Ignore changes of lighting, exposure or overall brightness.
- Keep it self-contained and under 200 words, without apologies or remarks about the task, and never repeat these rules."""

REASONING = """You write detailed prompts for an image-editing model and never change what the edit means.

The user shows two images: the question (the original) and the answer (the edited image). The edit instruction is: {instruction}

Do not output an image or a final answer. Write the reasoning that leads from the question image to the answer image:
- What changes in the answer image, and what stays as it was.
- Name what must not change: people's appearance (hairstyle, clothing, expression, skin tone, age), posture and pose, the visual style or genre, the spatial layout and the framing (close-up, medium shot, side view and so on).
- Describe pose and appearance in detail.
- Keep the image's style (photograph, anime, CG render, cinematic still, poster); if it is not obvious, pick the one the image suggests.
- Mention motion or camera movement when it matters (turning, walking, a dolly in or out, a pan), as natural movement of the people and objects.
- Keep quoted text, titles and names exactly as they are.
- If the two images do not differ, say that the image's structure and layout are to be kept exactly as they are.

Write about 80 to 100 words, starting with "The user wants to".

An example of the form:
The user wants to repaint the red bicycle leaning on the fence in glossy cobalt blue while leaving the rest of the street untouched. The bicycle keeps its position, angle and size; only its frame and mudguards change colour, with the same highlights, while the black tyres, chain and saddle stay as they are. The wooden fence, the cobbled pavement and the shop window behind it keep their layout, textures and soft morning light, and the photograph keeps its realistic style and eye-level medium shot."""

ENHANCE = """You rewrite editing instructions for an image-editing model into a short chain of reasoning that can be carried out visually.

The user shows the image to edit. Their instruction is: {instruction}

Do not output the edited image or a final answer. First decide which kind of task this is, then reason about how the image should be edited:
- Describe pose and appearance in detail.
- Keep the image's style (photograph, anime, CG render, cinematic still, poster); if it is not obvious, pick the one the image suggests.
- Mention motion or camera movement when it matters (turning, walking, a dolly in or out, a pan), as natural movement of the people and objects.
- Keep quoted text, titles and names exactly, in their own language.

Standard edits (adding, removing or replacing something, changing an action):
- For a replacement, say what is replaced and the key visual features of the new element.
- For text, say where it goes, its colour and its layout, briefly.
- "Extract" means keeping only the named object and removing the background: say "while removing the background".
- Name what must not change: people's appearance (hairstyle, clothing, expression, skin tone, age), posture and pose, the visual style or genre, the spatial layout and the framing (close-up, medium shot, side view and so on).

Placing a character or object in a new scenario:
- Keep its identity (appearance, materials, key features) and adapt its pose, interaction and context so that it fits the new setting naturally.
- Reason about how it interacts with the new scene: pose, hands, orientation, the direction it faces.
- The background changes completely to the new scenario and stays visually coherent.
- Say both what stays the same (its core appearance) and what changes (pose, interaction, setting).

Write about 80 to 100 words, starting with "The user wants to".

Example of a standard edit:
The user wants to give the old fisherman a yellow raincoat while keeping everything else about him unchanged. He still sits on the upturned crate mending the net, shoulders hunched and both hands holding the twine, his grey beard, weathered face and knitted cap exactly as before. The coat replaces his brown jacket, falls to his knees and shows wet creases along the sleeves. The harbour behind him, the moored boats and the overcast light stay the same, in the same documentary photographic style and close medium shot.

Example of a new scenario:
The user wants to place the small white robot in a snowy mountain camp at dusk. The robot keeps its rounded white shell, blue visor and orange antenna, now crouched beside a crackling campfire with both arms stretched towards the flames and its head tilted up at the first stars. The studio backdrop gives way to pine trees, a canvas tent and snow glowing orange near the fire, while the soft, clean 3D-render style of the original image is kept."""
