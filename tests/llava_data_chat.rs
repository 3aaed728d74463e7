//! LLaVA-NeXT chat templates (Mistral and Llama strings) and the chat's token ids and loss mask.

mod common;
#[path = "support/fixture_tokenizers.rs"]
mod fixture_tokenizers;

use am3safety::models::llava_next::chat::{
    placeholder_runs, render_chat, ChatMessage, LlavaChatOptions, LlavaChatTemplate, Part, TemplateKind,
};
use am3safety::models::llava_next::config::TextFamily;

#[path = "support/llava_data.rs"]
mod llava_data_support;
use llava_data_support::*;

#[test]
fn template_strings() {
    let q = vec![ChatMessage::user(vec![Part::Image(0), Part::Text("What is shown in this image?".into())])];
    let gen = LlavaChatOptions { add_generation_prompt: true, ..Default::default() };
    // model-spec B2 examples.
    assert_eq!(
        render_chat(TemplateKind::Mistral, &q, &gen).unwrap().text,
        "[INST] <image>\nWhat is shown in this image? [/INST]"
    );
    assert_eq!(
        render_chat(TemplateKind::Vicuna, &q, &gen).unwrap().text,
        "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    );

    let opts = LlavaChatOptions::default();
    let r = render_chat(TemplateKind::Mistral, &dialogue(), &opts).unwrap();
    assert_eq!(
        r.text,
        "[INST] <image>\nWhat is this? [/INST] A cat.</s> [INST] <image>\nAnd this? [/INST] A dog.</s> "
    );
    assert_eq!(r.image_order, vec![0, 1]);
    let tgt: Vec<&str> = r.targets.iter().map(|(_, rg)| &r.text[rg.clone()]).collect();
    assert_eq!(tgt, vec!["A cat.</s>", "A dog.</s>"]);

    let r = render_chat(TemplateKind::Vicuna, &dialogue(), &opts).unwrap();
    assert_eq!(r.text, "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: <image>\nAnd this? ASSISTANT: A dog. ");
    let tgt: Vec<&str> = r.targets.iter().map(|(_, rg)| &r.text[rg.clone()]).collect();
    assert_eq!(tgt, vec!["A cat.", "A dog."]);
    let eos = LlavaChatOptions { vicuna_eos: true, add_generation_prompt: true, ..Default::default() };
    let mut d = dialogue();
    d.push(ChatMessage::user(vec![Part::Image(2), Part::Image(3), Part::Text("Both?".into())]));
    let r = render_chat(TemplateKind::Vicuna, &d, &eos).unwrap();
    assert_eq!(
        r.text,
        "USER: <image>\nWhat is this? ASSISTANT: A cat.</s> USER: <image>\nAnd this? ASSISTANT: A dog.</s> USER: <image>\n<image>\nBoth? ASSISTANT:"
    );
    assert_eq!(r.image_order, vec![0, 1, 2, 3]);

    // System prompts.
    let mut s = vec![ChatMessage::system("Be safe.")];
    s.extend(dialogue().into_iter().take(2));
    assert_eq!(
        render_chat(TemplateKind::Mistral, &s, &opts).unwrap().text,
        "<<SYS>>\nBe safe.\n<</SYS>>\n\n[INST] <image>\nWhat is this? [/INST] A cat.</s> "
    );
    assert_eq!(
        render_chat(TemplateKind::Vicuna, &s, &opts).unwrap().text,
        "Be safe. USER: <image>\nWhat is this? ASSISTANT: A cat. "
    );

    // Roles the templates reject.
    let bad = vec![ChatMessage::new("tool", vec![Part::Text("x".into())])];
    assert!(render_chat(TemplateKind::Mistral, &bad, &opts).is_err());
    assert!(render_chat(TemplateKind::Vicuna, &bad, &opts).is_err());
}

#[test]
fn chat_tokens_and_loss_mask() {
    let tok = test_tokenizer();
    let mut cfg = fixture_config();
    let counts = [52usize, 72];
    for (family, want_targets) in [
        (TextFamily::Mistral, vec!["A", "cat", ".", "</s>", "A", "dog", ".", "</s>"]),
        (TextFamily::Llama, vec!["A", "cat", ".", "A", "dog", "."]),
    ] {
        cfg.text.family = family;
        let tmpl = LlavaChatTemplate::new(&tok, &cfg).unwrap();
        let ct = tmpl.encode_chat(&dialogue(), &counts, &LlavaChatOptions::default()).unwrap();
        assert_eq!(ct.ids[0], 1, "BOS first");
        assert_eq!(ct.ids.len(), ct.loss_mask.len());
        assert_eq!(ct.image_tokens, vec![52, 72]);
        let runs = placeholder_runs(&ct.ids, 590);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![52, 72]);
        assert!(runs.iter().all(|r| ct.loss_mask[r.clone()].iter().all(|&m| m == 0)));
        assert!(!ct.ids.contains(&0), "no <unk> in {:?}", ct.ids);
        let targets: Vec<String> = ct
            .ids
            .iter()
            .zip(&ct.loss_mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| tok.id_to_token(i as u32).unwrap())
            .collect();
        println!("{family:?}: {} tokens, targets {targets:?}", ct.ids.len());
        assert_eq!(targets, want_targets);
        assert_eq!(ct.assistant_spans.iter().map(|(m, _)| *m).collect::<Vec<_>>(), vec![1, 3]);
        for (_, sp) in &ct.assistant_spans {
            assert!(ct.loss_mask[sp.clone()].iter().all(|&m| m == 1));
        }
    }
    // Vicuna with the EOS option: the `</s>` after each reply is a target.
    cfg.text.family = TextFamily::Llama;
    let opts = LlavaChatOptions { vicuna_eos: true, ..Default::default() };
    let ct = LlavaChatTemplate::new(&tok, &cfg).unwrap().encode_chat(&dialogue(), &counts, &opts).unwrap();
    let n_eos = ct.ids.iter().zip(&ct.loss_mask).filter(|(&i, &m)| i == 2 && m == 1).count();
    assert_eq!(n_eos, 2);

    // Errors: too few counts, a mismatched image id, a literal <image> in the text.
    let tmpl = LlavaChatTemplate::new(&tok, &cfg).unwrap();
    assert!(tmpl.encode_chat(&dialogue(), &[52], &LlavaChatOptions::default()).is_err());
    let mut wrong = cfg.clone();
    wrong.image_token_index = 591;
    assert!(LlavaChatTemplate::new(&tok, &wrong).is_err());
    let lit = vec![ChatMessage::user(vec![Part::Text("see <image> here".into())])];
    assert!(tmpl.encode_chat(&lit, &[], &LlavaChatOptions::default()).is_err());
}
