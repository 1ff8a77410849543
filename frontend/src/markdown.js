// Markdown for untrusted text (model outputs, project instructions).
// html: false makes markdown-it escape raw HTML, so its output is safe for innerHTML;
// nothing else in this app may be assigned to innerHTML.
import MarkdownIt from 'markdown-it';

const md = new MarkdownIt({ html: false, linkify: false, typographer: false });

// Remote images in model output would make the annotator's browser contact arbitrary
// hosts; with the image rule off `![alt](url)` renders as "!" followed by a plain link.
md.disable('image');

const defaultLinkOpen = md.renderer.rules.link_open
  || ((tokens, idx, options, env, self) => self.renderToken(tokens, idx, options));

md.renderer.rules.link_open = (tokens, idx, options, env, self) => {
  const token = tokens[idx];
  token.attrSet('target', '_blank');
  token.attrSet('rel', 'noopener noreferrer');
  return defaultLinkOpen(tokens, idx, options, env, self);
};

export function renderMarkdown(source) {
  return md.render(typeof source === 'string' ? source : '');
}
