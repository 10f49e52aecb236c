r"""Chat templates that render tool schemas, hermes tool calls, and tool messages *with their images*.

verl's multi-turn loop tokenises a tool's reply by rendering the conversation with and without it and
keeping the difference (``verl/utils/tokenizer/continuous_token.py``: ``render_delta_token_id``), so a
template must render ``tools``, an assistant message's ``tool_calls`` and ``tool`` messages whose
content holds image parts, and must render a prefix of a conversation as a prefix of its rendering.
The stock Qwen2.5-VL template has no tool support, and Qwen2.5's renders a tool message's content as a
string (an image part is lost); both are replaced here.

* :data:`TINY_TOOL_CHAT_TEMPLATE` -- the tiny Qwen2.5-VL's own template (verl_grto/assets/tokenizer.py)
  with tools as one short line of the system turn (``Tools: segment(bbox, points, negative_points).``: a
  0.8M-parameter policy reads 10 tokens, not Qwen's 150-token tool preamble), calls as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and tool messages as a ``tool`` turn. It
  renders a conversation without tools exactly as the single-turn template does (tested).
* :data:`QWEN25VL_TOOL_CHAT_TEMPLATE` -- for the full-size Qwen2.5-VL recipes: Qwen2.5's hermes tool
  format (the ``# Tools`` system preamble with ``<tools>`` JSON, ``<tool_call>\n{...}\n</tool_call>``,
  tool replies inside ``<|im_start|>user\n<tool_response>\n...\n</tool_response>``) with content parts
  rendered as Qwen2.5-VL renders them, so the mask image of a tool reply reaches the model. Set it with
  ``actor_rollout_ref.model.custom_chat_template`` (the recipes use ``${grto_chat_template:qwen25vl_tool}``).
"""

from __future__ import annotations

#: The tiny template's default system turn (the single-turn template's, verl_grto/assets/tokenizer.py).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def content_parts(content: str) -> str:
    """Jinja that renders the content parts of ``content`` (an expression naming a message's content list) as
    Qwen2.5-VL does: an image part as ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor expands
    the pad to one token per merged patch), a video part likewise, a text part as its text. Shared by the
    tiny policy's single-turn template (verl_grto/assets/tokenizer.py) and the tool templates here."""
    return (
        f"{{% for part in {content} %}}"
        "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'video' or 'video' in part %}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in part %}"
        "{{ part['text'] }}"
        "{% endif %}"
        "{% endfor %}"
    )


_TOOLS_LINE = (
    "{% if tools %} Tools: "
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{{ f['name'] }}({{ f['parameters']['properties'] | list | join(', ') }})"
    "{% if not loop.last %}; {% endif %}{% endfor %}.{% endif %}"
)
_CALLS = (
    "{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    '<tool_call>{"name": "{{ f[\'name\'] }}", "arguments": '
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}"
)

#: The tiny policy's template with tool support (see the module docstring). One line: every newline is meant.
TINY_TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + _TOOLS_LINE + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% set content = message['content'] %}"
    "{% if content is string %}{{ content }}{% elif content %}" + content_parts("content") + "{% endif %}"
    "{% if loop.first and message['role'] == 'system' %}" + _TOOLS_LINE + "{% endif %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    + _CALLS
    + "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

#: Qwen2.5's hermes tool template with Qwen2.5-VL's content parts (images in tool replies kept).
QWEN25VL_TOOL_CHAT_TEMPLATE = r"""{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content -%}
{%- for part in content -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in part -%}{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\n' }}{{- render(messages[0]['content']) }}
{%- else -%}
{{- '<|im_start|>system\nYou are a helpful assistant.' }}
{%- endif -%}
{%- if tools -%}
{{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools -%}{{- "\n" }}{{- tool | tojson }}{%- endfor -%}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>" }}
{%- endif -%}
{{- '<|im_end|>\n' }}
{%- for message in messages -%}
{%- if message['role'] == 'system' and loop.first -%}
{%- elif message['role'] == 'user' or message['role'] == 'system' or (message['role'] == 'assistant' and not message['tool_calls']) -%}
{{- '<|im_start|>' + message['role'] + '\n' }}{{- render(message['content']) }}{{- '<|im_end|>\n' }}
{%- elif message['role'] == 'assistant' -%}
{{- '<|im_start|>assistant' }}
{%- if message['content'] -%}{{- '\n' }}{{- render(message['content']) }}{%- endif -%}
{%- for call in message['tool_calls'] -%}
{%- set f = call['function'] if call['function'] is defined else call -%}
{{- '\n<tool_call>\n{"name": "' }}{{- f['name'] }}{{- '", "arguments": ' }}
{%- if f['arguments'] is string -%}{{- f['arguments'] }}{%- else -%}{{- f['arguments'] | tojson }}{%- endif -%}
{{- '}\n</tool_call>' }}
{%- endfor -%}
{{- '<|im_end|>\n' }}
{%- elif message['role'] == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' }}{%- endif -%}
{{- '\n<tool_response>\n' }}{{- render(message['content']) }}{{- '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' }}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' }}{%- endif -%}"""

TEMPLATES = {"tiny_tool": TINY_TOOL_CHAT_TEMPLATE, "qwen25vl_tool": QWEN25VL_TOOL_CHAT_TEMPLATE}
