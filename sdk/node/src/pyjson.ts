/**
 * JSON text as Python's `json.dumps` writes it with its defaults (", " and ": " separators,
 * non-ASCII escaped, floats as Python's repr), because flag conditions compare non-string values
 * by that text, and the Node SDK must match what the server and the Python SDK compute.
 *
 * What JavaScript cannot tell apart stays apart from Python: a number with no fraction is
 * written as an integer (Python writes a float parsed from `1.0` as `1.0`), integers beyond
 * 2^53 lose their digits, and an object's integer-like keys come first (JavaScript's order).
 */

export function pythonJson(value: unknown): string {
  if (value === null || value === undefined) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'string') return pythonString(value);
  if (typeof value === 'number') return pythonNumber(value);
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Date) return pythonString(value.toISOString());
  if (Array.isArray(value)) return `[${value.map(pythonJson).join(', ')}]`;
  if (typeof value === 'object') {
    const items = Object.entries(value as Record<string, unknown>).map(
      ([k, v]) => `${pythonString(k)}: ${pythonJson(v)}`,
    );
    return `{${items.join(', ')}}`;
  }
  return pythonString(String(value));
}

const SHORT: Readonly<Record<string, string>> = {
  '"': '\\"',
  '\\': '\\\\',
  '\n': '\\n',
  '\r': '\\r',
  '\t': '\\t',
  '\b': '\\b',
  '\f': '\\f',
};

function pythonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    const code = s.charCodeAt(i);
    const short = SHORT[ch];
    if (short !== undefined) out += short;
    else if (code >= 0x20 && code <= 0x7e) out += ch;
    else out += '\\u' + code.toString(16).padStart(4, '0'); // UTF-16 units, as Python's
  }
  return out + '"';
}

function pythonNumber(x: number): string {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'Infinity';
  if (x === -Infinity) return '-Infinity';
  if (Number.isSafeInteger(x)) return String(x === 0 ? 0 : x); // an int (-0 parsed as 0)
  // Python's float repr: the shortest digits that round-trip (as JavaScript's), written fixed
  // when the decimal exponent is in [-4, 16), else as d.ddde+XX.
  const [mantissa, exp10] = x.toExponential().split('e') as [string, string];
  const exp = Number(exp10);
  const negative = mantissa.startsWith('-');
  const digits = mantissa.replace('-', '').replace('.', '');
  let body: string;
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    body = `${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  } else if (exp >= 0) {
    const whole = digits.slice(0, exp + 1).padEnd(exp + 1, '0');
    body = `${whole}.${digits.slice(exp + 1) || '0'}`;
  } else {
    body = `0.${'0'.repeat(-exp - 1)}${digits}`;
  }
  return (negative ? '-' : '') + body;
}
