package de.medizininformatik_initiative.omi.dsf;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;

import java.io.IOException;
import java.io.InputStream;
import java.net.URISyntaxException;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;

import org.hl7.fhir.r4.model.Resource;
import org.junit.ClassRule;
import org.junit.Test;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.ValidationResult;
import dev.dsf.bpe.v1.ProcessPluginDefinition;
import dev.dsf.fhir.validation.ResourceValidator;
import dev.dsf.fhir.validation.ResourceValidatorImpl;
import dev.dsf.fhir.validation.ValidationSupportRule;

/**
 * Runs the DSF's own FHIR validator (dev.dsf:dsf-fhir-validation) over every resource the plugin
 * ships and over one example Task per Task profile, as a DSF FHIR server would on upload / create.
 */
public class GeneratedResourcesValidTest
{
	private static final Logger logger = LoggerFactory.getLogger(GeneratedResourcesValidTest.class);
	private static final PluginIndex index = PluginIndex.get();
	private static final ProcessPluginDefinition definition = new OmiProcessPluginDefinition();
	private static final String ORGANIZATION = "Test_DIC";

	private static List<String> ours(String type)
	{
		return index.getFhirResourcesByProcessId().values().stream().flatMap(List::stream)
				.filter(p -> p.startsWith("fhir/" + type + "/")).map(p -> p.substring(("fhir/" + type + "/").length()))
				.distinct().collect(Collectors.toList());
	}

	private static List<String> with(List<String> dsf, List<String> plugin)
	{
		List<String> all = new ArrayList<>(dsf);
		all.addAll(plugin);
		return all;
	}

	@ClassRule
	public static final ValidationSupportRule validationRule = new ValidationSupportRule(
			definition.getResourceVersion(), definition.getReleaseDate(),
			with(List.of("dsf-task-base-1.0.0.xml", "dsf-activity-definition-1.0.0.xml",
					"dsf-questionnaire-1.5.0.xml", "dsf-questionnaire-response-1.0.0.xml",
					"dsf-extension-process-authorization-1.0.0.xml",
					"dsf-extension-process-authorization-organization-1.0.0.xml",
					"dsf-extension-process-authorization-organization-practitioner-1.0.0.xml",
					"dsf-extension-process-authorization-parent-organization-role-1.0.0.xml",
					"dsf-extension-process-authorization-parent-organization-role-practitioner-1.0.0.xml",
					"dsf-extension-process-authorization-practitioner-1.0.0.xml",
					"dsf-coding-process-authorization-local-all-1.0.0.xml",
					"dsf-coding-process-authorization-local-all-practitioner-1.0.0.xml",
					"dsf-coding-process-authorization-local-organization-1.0.0.xml",
					"dsf-coding-process-authorization-local-organization-practitioner-1.0.0.xml",
					"dsf-coding-process-authorization-local-parent-organization-role-1.0.0.xml",
					"dsf-coding-process-authorization-local-parent-organization-role-practitioner-1.0.0.xml",
					"dsf-coding-process-authorization-remote-all-1.0.0.xml",
					"dsf-coding-process-authorization-remote-organization-1.0.0.xml",
					"dsf-coding-process-authorization-remote-parent-organization-role-1.0.0.xml"),
					ours("StructureDefinition")),
			with(List.of("dsf-bpmn-message-1.0.0.xml", "dsf-organization-role-1.0.0.xml",
					"dsf-practitioner-role-1.0.0.xml", "dsf-process-authorization-1.0.0.xml",
					"dsf-read-access-tag-1.0.0.xml"), ours("CodeSystem")),
			with(List.of("dsf-bpmn-message-1.0.0.xml", "dsf-organization-role-1.0.0.xml",
					"dsf-practitioner-role-1.0.0.xml", "dsf-process-authorization-recipient-1.0.0.xml",
					"dsf-process-authorization-requester-1.0.0.xml", "dsf-read-access-tag-1.0.0.xml"),
					ours("ValueSet")));

	private final ResourceValidator validator = new ResourceValidatorImpl(validationRule.getFhirContext(),
			validationRule.getValidationSupport());

	/** What the BPE does when it loads the plugin: replace the placeholders. */
	private static String resolve(String text)
	{
		return text.replace("#{version}", definition.getResourceVersion())
				.replace("#{date}", definition.getResourceReleaseDate().toString())
				.replace("#{organization}", ORGANIZATION);
	}

	private Resource read(String text)
	{
		return (Resource) validationRule.getFhirContext().newXmlParser().parseResource(resolve(text));
	}

	private List<String> errors(String name, String text)
	{
		ValidationResult result = validator.validate(read(text));
		return result.getMessages().stream()
				.filter(m -> m.getSeverity() == ResultSeverityEnum.ERROR || m.getSeverity() == ResultSeverityEnum.FATAL)
				.map(m -> name + " " + m.getLocationString() + ": " + m.getMessage()).collect(Collectors.toList());
	}

	private static String classpath(String path) throws IOException
	{
		try (InputStream in = GeneratedResourcesValidTest.class.getResourceAsStream("/" + path))
		{
			assertNotNull("missing from the jar: " + path, in);
			return new String(in.readAllBytes(), StandardCharsets.UTF_8);
		}
	}

	@Test
	public void pluginResourcesAreValid() throws Exception
	{
		List<String> failures = new ArrayList<>();
		List<String> resources = index.getFhirResourcesByProcessId().values().stream().flatMap(List::stream)
				.distinct().toList();
		assertFalse(resources.isEmpty());
		for (String path : resources)
			failures.addAll(errors(path, classpath(path)));
		failures.forEach(logger::error);
		assertEquals("DSF validation errors: " + failures, 0, failures.size());
	}

	@Test
	public void exampleTasksAreValid() throws Exception
	{
		URL dir = GeneratedResourcesValidTest.class.getResource("/examples/Task");
		assertNotNull("no example Tasks generated", dir);
		List<String> failures = new ArrayList<>();
		int count = 0;
		try (Stream<Path> files = Files.list(Paths.get(toUri(dir))))
		{
			for (Path file : files.filter(f -> f.toString().endsWith(".xml")).sorted().toList())
			{
				failures.addAll(errors(file.getFileName().toString(), Files.readString(file)));
				count++;
			}
		}
		assertEquals("one example per Task profile", ours("StructureDefinition").size(), count);
		failures.forEach(logger::error);
		assertEquals("DSF validation errors: " + failures, 0, failures.size());
	}

	@Test
	public void brokenTaskIsRejected() throws Exception
	{
		// the validator must see a broken Task, or the tests above prove nothing
		URL dir = GeneratedResourcesValidTest.class.getResource("/examples/Task");
		Path any;
		try (Stream<Path> files = Files.list(Paths.get(toUri(dir))))
		{
			any = files.filter(f -> f.toString().endsWith(".xml")).sorted().findFirst().orElseThrow();
		}
		String broken = Files.readString(any).replace("<intent value=\"order\" />", "<intent value=\"proposal\" />");
		assertFalse("a Task with intent=proposal must fail", errors("broken", broken).isEmpty());
	}

	private static java.net.URI toUri(URL url)
	{
		try
		{
			return url.toURI();
		}
		catch (URISyntaxException e)
		{
			throw new IllegalStateException(e);
		}
	}
}
