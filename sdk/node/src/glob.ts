/**
 * Python's `fnmatch.fnmatchcase`, which the `glob` condition uses on the server: `*` any run of
 * characters, `?` one character, `[seq]` / `[!seq]` a set (ranges `a-z`; a `]` first in the set is
 * a member; a `-` first or last is itself; a reversed range matches nothing), an unclosed `[` is
 * itself, case matters and there is no escape character. Characters are code points.
 */

type Token =
  | { kind: 'star' }
  | { kind: 'any' }
  | { kind: 'char'; cp: number }
  | { kind: 'set'; negate: boolean; ranges: Array<[number, number]> };

function tokens(pattern: string): Token[] {
  const pat = Array.from(pattern, (c) => c.codePointAt(0)!);
  const out: Token[] = [];
  const [STAR, QUESTION, OPEN, CLOSE, BANG, DASH] = [42, 63, 91, 93, 33, 45];
  let i = 0;
  while (i < pat.length) {
    const c = pat[i++]!;
    if (c === STAR) {
      if (out.at(-1)?.kind !== 'star') out.push({ kind: 'star' });
    } else if (c === QUESTION) {
      out.push({ kind: 'any' });
    } else if (c === OPEN) {
      let j = i;
      if (j < pat.length && pat[j] === BANG) j++;
      if (j < pat.length && pat[j] === CLOSE) j++;
      while (j < pat.length && pat[j] !== CLOSE) j++;
      if (j >= pat.length) {
        out.push({ kind: 'char', cp: OPEN });
        continue;
      }
      const negate = pat[i] === BANG;
      const members = pat.slice(negate ? i + 1 : i, j);
      const ranges: Array<[number, number]> = [];
      for (let k = 0; k < members.length; k++) {
        const lo = members[k]!;
        if (members[k + 1] === DASH && k + 2 < members.length) {
          const hi = members[k + 2]!;
          if (lo <= hi) ranges.push([lo, hi]);
          k += 2;
        } else {
          ranges.push([lo, lo]);
        }
      }
      out.push({ kind: 'set', negate, ranges });
      i = j + 1;
    } else {
      out.push({ kind: 'char', cp: c });
    }
  }
  return out;
}

function one(token: Token, cp: number): boolean {
  switch (token.kind) {
    case 'any':
      return true;
    case 'char':
      return token.cp === cp;
    case 'set':
      return token.ranges.some(([lo, hi]) => lo <= cp && cp <= hi) !== token.negate;
    default:
      return false;
  }
}

export function globMatch(text: string, pattern: string): boolean {
  const toks = tokens(pattern);
  const s = Array.from(text, (c) => c.codePointAt(0)!);
  // Greedy with one backtrack point: the last `*` takes one more character on a mismatch.
  let t = 0;
  let p = 0;
  let starP = -1;
  let starT = 0;
  while (t < s.length) {
    const tok = toks[p];
    if (tok !== undefined && tok.kind === 'star') {
      starP = p++;
      starT = t;
    } else if (tok !== undefined && one(tok, s[t]!)) {
      p++;
      t++;
    } else if (starP >= 0) {
      p = starP + 1;
      t = ++starT;
    } else {
      return false;
    }
  }
  while (toks[p]?.kind === 'star') p++;
  return p === toks.length;
}
